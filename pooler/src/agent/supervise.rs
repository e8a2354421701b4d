//! Every 500 ms: is the postmaster alive, what role does Postgres answer with (published to
//! the links), and, with `supervise`, restart a Postgres that crashed.
//!
//! "Crashed" means `postmaster.pid` names a process that is gone. A clean shutdown (`pg_ctl
//! stop`, any mode) removes the file: somebody meant it, and the supervisor leaves it stopped.
//! Nothing happens while an operation holds the lock (a follow stops Postgres on purpose).

use super::pgctl::Postmaster;
use super::Agent;
use std::rc::Rc;
use std::time::Duration;

const EVERY: Duration = Duration::from_millis(500);

pub async fn run(agent: Rc<Agent>) {
    loop {
        if let Ok(_op) = agent.op.try_lock() {
            restart_if_crashed(&agent).await;
        }
        // Publishes the role the links announce.
        let _ = agent.report().await;
        tokio::time::sleep(EVERY).await;
    }
}

async fn restart_if_crashed(agent: &Agent) {
    let Some(pgctl) = &agent.pgctl else {
        return;
    };
    match pgctl.postmaster() {
        Postmaster::Running(pid) => pgctl.learn_log(pid),
        Postmaster::Crashed(pid) if agent.cfg.supervise => {
            tracing::warn!(pid, "postgres crashed; restarting it");
            match pgctl.start(agent.wait()).await {
                Ok(()) => tracing::warn!("postgres restarted"),
                // Its orphaned backends may still hold the shared memory: next round.
                Err(e) => tracing::warn!(error = %e, "restarting postgres failed"),
            }
        }
        _ => {}
    }
}
