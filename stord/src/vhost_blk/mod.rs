//! vhost-user-blk: every attachment of a volume is a Unix socket that a VM process
//! (or any vhost-user-blk frontend) connects to.

pub mod backend;
pub mod config;
pub mod request;
pub mod server;
pub mod uring;

pub use backend::{BlkBackend, GuestMem};
pub use request::Counters;
pub use server::{Attachment, Error};
