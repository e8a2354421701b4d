//! Calls to node agents from the async control loop: the agent client is blocking (plain
//! `std::net`), so each call runs on tokio's blocking pool, and calls to several nodes run at
//! once.

use std::time::Duration;

use shared::agent::{self, AgentAccess, Report, Request, Response};

use crate::state::NodeRecord;

/// A node's report, or why there is none.
pub type Probe = Result<Report, String>;

/// One request, authenticated with `key` (over TLS when it has a CA); a `Refused` answer is an error carrying the
/// agent's reason. (`agent::call` refuses reports whose terms are out of bounds.)
pub async fn call(
    key: &AgentAccess,
    node: &NodeRecord,
    req: Request,
    timeout_ms: u64,
) -> Result<Report, String> {
    let addr = node.agent;
    let name = node.name.clone();
    let key = key.clone();
    let timeout = Duration::from_millis(timeout_ms.max(1));
    let joined =
        tokio::task::spawn_blocking(move || agent::call_with(addr, &key, &req, timeout)).await;
    match joined {
        Ok(Ok(Response::Ok { report })) => Ok(report),
        Ok(Ok(Response::Refused { reason, .. })) => Err(format!("{name} refused: {reason}")),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// The same request to every node at once, answers in node order.
pub async fn each(
    key: &AgentAccess,
    nodes: &[NodeRecord],
    req: impl Fn(&NodeRecord) -> Option<Request>,
    timeout_ms: u64,
) -> Vec<Option<Probe>> {
    let mut tasks = Vec::with_capacity(nodes.len());
    for n in nodes {
        let node = n.clone();
        let key = key.clone();
        let r = req(n);
        tasks.push(tokio::spawn(async move {
            match r {
                Some(r) => Some(call(&key, &node, r, timeout_ms).await),
                None => None,
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Some(Err(e.to_string()))));
    }
    out
}

/// Every node's report.
pub async fn all(key: &AgentAccess, nodes: &[NodeRecord], timeout_ms: u64) -> Vec<Probe> {
    each(key, nodes, |_| Some(Request::Report), timeout_ms)
        .await
        .into_iter()
        .map(|p| p.unwrap_or_else(|| Err("not asked".into())))
        .collect()
}
