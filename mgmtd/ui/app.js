"use strict";
// Node overview: polls /api/v1/node and renders one row per daemon.

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function uptime(secs) {
  if (secs == null) return "—";
  const h = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function render(report) {
  document.getElementById("node").textContent =
    `${report.hostname} · node ${report.node_id} · v${report.version}`;
  const overall = document.getElementById("overall");
  overall.textContent = report.healthy ? "healthy" : "degraded";
  overall.className = "badge " + (report.healthy ? "ok" : "bad");
  const body = document.querySelector("#daemons tbody");
  body.replaceChildren(...report.daemons.map((d) => {
    const tr = document.createElement("tr");
    tr.dataset.daemon = d.name;
    tr.append(
      cell(d.name),
      cell(d.bus_name, "mono"),
      cell(d.health, d.health === "ok" ? "ok" : "bad"),
      cell(d.pid ?? "—"),
      cell(d.version ?? "—"),
      cell(uptime(d.uptime_secs)),
      cell(d.restarts ?? "—"),
      cell(d.health_detail || d.last_exit || ""),
    );
    return tr;
  }));
  document.body.dataset.loaded = "true";
}

async function refresh() {
  const err = document.getElementById("error");
  try {
    const res = await fetch("/api/v1/node", { headers: { Accept: "application/json" } });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
    err.hidden = true;
  } catch (e) {
    err.textContent = `Cannot reach the node: ${e.message}`;
    err.hidden = false;
  }
}

refresh();
setInterval(refresh, 2000);
