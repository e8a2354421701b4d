//! What the gateway knows about SQL text without a backend: the statement classifier and the
//! pieces it is made of, as a library so the microbenchmarks (`benches/classify.rs`) measure
//! the very code the binary (main.rs) runs on every statement.

pub mod builtins;
pub mod calls;
pub mod classify;
pub mod hba;
pub mod statement_names;
