//! The HTTPS API and web UI.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the web UI (node overview) |
//! | `GET /ui/*` | UI script and stylesheet |
//! | `GET /api/v1/node` | [`NodeReport`](crate::report::NodeReport): the node's daemons as read over D-Bus |
//!
//! `/api/v1/node` is the node's health endpoint and needs no login, like a load
//! balancer probe; it reveals versions and process ids, nothing tenant-owned.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use zbus::Connection;

use crate::report;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Connection to the node's bus.
    pub bus: Connection,
    /// This node's identifier.
    pub node_id: String,
}

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

/// The router with every route and the security headers.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/v1/node", get(node))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn node(State(state): State<AppState>) -> Json<report::NodeReport> {
    Json(report::collect(&state.bus, &state.node_id).await)
}

/// JSON error body used by every failing route.
pub fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    for (name, value) in [
        ("strict-transport-security", "max-age=31536000"),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'",
        ),
        ("cache-control", "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}
