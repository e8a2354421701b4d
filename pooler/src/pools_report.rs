//! The pooler's answer to the gateway admin console's `up::POOLS`: every pool of every core,
//! from the atomics each core already publishes for rebalancing (`budget::CoreShare`) plus the
//! idle count, and every backend (`servers.rs`). Built on the core that received the request;
//! no message to other cores.

use crate::core::Core;
use shared::link::{PoolFact, PoolFacts};
use std::sync::atomic::Ordering;

pub fn facts(core: &Core) -> PoolFacts {
    let mut pools: Vec<PoolFact> = core
        .budgets
        .all()
        .into_iter()
        .map(|(key, b)| {
            let sum = |f: &dyn Fn(&crate::budget::CoreShare) -> u64| -> u64 {
                b.cores.iter().map(f).sum()
            };
            PoolFact {
                user: key.user,
                database: key.database,
                backends: b.count.load(Ordering::Relaxed) as u32,
                idle: sum(&|c| c.idle.load(Ordering::Relaxed) as u64) as u32,
                waiting: b.waiting.load(Ordering::Relaxed) as u32,
                waited_us: sum(&|c| c.waited_us.load(Ordering::Relaxed)),
            }
        })
        .collect();
    pools.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
    PoolFacts {
        pool_size: core.budgets.pool_size() as u32,
        max_backends: core.budgets.max_total() as u32,
        pools,
        servers: crate::servers::facts(core.live().server_lifetime_ms),
    }
}
