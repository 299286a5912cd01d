//! The node's state in SQLite: schema, migrations and the first admin account.

use std::path::{Path, PathBuf};

use argon2::password_hash::{rand_core::OsRng, rand_core::RngCore, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use rusqlite::{params, Connection, OptionalExtension};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "mgmtd.db";
/// File holding the generated admin password until the admin changes it.
pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";
/// Name of the administrator account created on first start.
pub const ADMIN_USER: &str = "admin";

/// Schema migrations; entry `i` brings the database to version `i + 1`.
const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at_us INTEGER NOT NULL
     );
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_us INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
     );"];

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed.
    #[error("database {0}")]
    Sqlite(PathBuf, #[source] rusqlite::Error),
    /// The database was written by a newer mgmtd.
    #[error("database {path} has schema version {found}, newer than this mgmtd knows ({known})")]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version found in the file.
        found: i64,
        /// Highest version this build knows.
        known: i64,
    },
    /// The password could not be hashed.
    #[error("cannot hash a password: {0}")]
    Hash(String),
    /// The initial password file could not be written.
    #[error("cannot write {0}")]
    WritePassword(PathBuf, #[source] std::io::Error),
}

/// The open database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Opens (creating if needed) the database in `dir` and migrates it.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(DB_FILE);
        let sql = |e| Error::Sqlite(path.clone(), e);
        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(Error::TooNew {
                path,
                found: version,
                known,
            });
        }
        for (i, migration) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            let tx = conn.transaction().map_err(sql)?;
            tx.execute_batch(migration).map_err(sql)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(sql)?;
            tx.commit().map_err(sql)?;
            tracing::info!(version = i + 1, "database migrated");
        }
        Ok(Self { conn, path })
    }

    fn sql(&self, e: rusqlite::Error) -> Error {
        Error::Sqlite(self.path.clone(), e)
    }

    /// Creates the admin account with a random password on first start. The password
    /// is written (mode 0600) to [`INITIAL_PASSWORD_FILE`] in `dir` before the
    /// account is committed, so it can never exist with an unknown password.
    /// Returns true when the account was created now.
    pub fn bootstrap_admin(&mut self, dir: &Path) -> Result<bool, Error> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM users WHERE name = ?1",
                [ADMIN_USER],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        if exists.is_some() {
            return Ok(false);
        }
        let password = generate_password();
        let hash = hash_password(&password)?;
        let file = dir.join(INITIAL_PASSWORD_FILE);
        crate::tls::write_atomic(&file, format!("{password}\n").as_bytes(), 0o600)
            .map_err(|e| Error::WritePassword(file.clone(), e))?;
        let now = i64::try_from(crate::dbus::now_us()).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .transaction()
            .map_err(|e| Error::Sqlite(self.path.clone(), e))?;
        tx.execute(
            "INSERT INTO users (name, password_hash, role, created_at_us) VALUES (?1, ?2, 'Administrator', ?3)",
            params![ADMIN_USER, hash, now],
        )
        .and_then(|_| {
            tx.execute(
                "INSERT INTO audit (at_us, actor, action, target, detail) VALUES (?1, 'mgmtd', 'user.create', ?2, 'initial administrator')",
                params![now, ADMIN_USER],
            )
        })
        .map_err(|e| Error::Sqlite(self.path.clone(), e))?;
        tx.commit()
            .map_err(|e| Error::Sqlite(self.path.clone(), e))?;
        tracing::info!(file = %file.display(), "created the admin account");
        Ok(true)
    }

    /// Checks `password` against the stored hash of `user`.
    pub fn verify_password(&self, user: &str, password: &str) -> Result<bool, Error> {
        let hash: Option<String> = self
            .conn
            .query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some(hash) = hash else { return Ok(false) };
        let parsed = PasswordHash::new(&hash).map_err(|e| Error::Hash(e.to_string()))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    }

    /// Number of audit records.
    pub fn audit_count(&self) -> Result<i64, Error> {
        self.conn
            .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
            .map_err(|e| self.sql(e))
    }
}

/// Argon2id hash in PHC string form.
pub fn hash_password(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Hash(e.to_string()))
}

/// 20 random characters from an alphabet without look-alikes (~115 bits).
fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::with_capacity(20);
    while out.len() < 20 {
        let mut b = [0u8; 1];
        OsRng.fill_bytes(&mut b);
        // Rejection sampling keeps the distribution uniform.
        let limit = 256 - 256 % ALPHABET.len();
        if usize::from(b[0]) < limit {
            out.push(char::from(ALPHABET[usize::from(b[0]) % ALPHABET.len()]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_is_created_once_with_the_written_password() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path()).unwrap();
        assert!(db.bootstrap_admin(dir.path()).unwrap());
        let pw = std::fs::read_to_string(dir.path().join(INITIAL_PASSWORD_FILE)).unwrap();
        let pw = pw.trim();
        assert_eq!(pw.len(), 20);
        assert!(db.verify_password(ADMIN_USER, pw).unwrap());
        assert!(!db.verify_password(ADMIN_USER, "wrong").unwrap());
        drop(db);
        let mut db = Db::open(dir.path()).unwrap();
        assert!(
            !db.bootstrap_admin(dir.path()).unwrap(),
            "second start must keep the account"
        );
        assert!(db.verify_password(ADMIN_USER, pw).unwrap());
        assert_eq!(db.audit_count().unwrap(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Db::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Db::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
