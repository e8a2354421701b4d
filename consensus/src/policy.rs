//! Durability policies: which sets of nodes make a commit durable, compiled to the
//! `synchronous_standby_names` that makes the primary wait for such a set, and the failover
//! rule that follows from them. The language and the proofs are in docs/policy.md.
//!
//! A policy is a conjunction of terms:
//!
//! ```text
//! policy := term ("and" term)*
//! term   := "any" N      -- at least N nodes hold the commit (the primary counts)
//!         | "zones" N    -- the nodes holding it span at least N zones (the primary's counts)
//! ```
//!
//! Only two numbers matter in the end: the largest `any` (M) and the largest `zones` (Z);
//! the terms are kept as written so that `Display` gives back what the operator wrote.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A node as the policy sees it: its name (the standby's `application_name`, which is what
/// `synchronous_standby_names` lists) and its zone label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// The node's name, unique in the cohort.
    pub name: String,
    /// The zone the node runs in (any label; nodes with equal labels share a zone).
    pub zone: String,
}

impl Node {
    /// A node named `name` in zone `zone`.
    pub fn new(name: impl Into<String>, zone: impl Into<String>) -> Node {
        Node {
            name: name.into(),
            zone: zone.into(),
        }
    }
}

/// One term of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// `any N`: at least N nodes hold the commit, the primary included.
    Any(usize),
    /// `zones N`: the nodes holding the commit span at least N distinct zones.
    Zones(usize),
}

/// A durability policy: every term must hold (`any 2 and zones 2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    terms: Vec<Term>,
}

/// What can go wrong with a policy: it does not parse, or the nodes at hand cannot satisfy
/// it, or a failover's recruits are not enough.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a policy; the message says what was expected.
    #[error("durability policy {text:?}: {message} (expected e.g. \"any 2\", \"zones 2\", \"any 3 and zones 2\")")]
    Parse { text: String, message: String },
    /// The primary and its standbys cannot satisfy the policy: commits would wait forever.
    #[error("durability policy \"{policy}\" cannot be met with primary {primary:?} and standbys [{standbys}]: {reason}")]
    Unsatisfiable {
        policy: String,
        primary: String,
        standbys: String,
        reason: String,
    },
    /// Failover: the recruits are not a majority of the cohort.
    #[error("only {recruited} of {cohort} nodes recruited: a majority is needed")]
    NoMajority { recruited: usize, cohort: usize },
    /// Failover: the nodes not recruited could on their own have acknowledged a commit that
    /// no recruit holds.
    #[error("the nodes not recruited [{rest}] could satisfy durability policy \"{policy}\" on their own, so a recruit may lack an acknowledged commit")]
    RestSatisfies { rest: String, policy: String },
}

/// A compiled `synchronous_standby_names`: the primary waits until `k` of `names` have
/// flushed a commit (`ANY k (...)`); `k == 0` means it waits for nobody (the empty setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRule {
    /// How many of `names` must acknowledge.
    pub k: usize,
    /// The standbys that may acknowledge, in the order they were given.
    pub names: Vec<String>,
}

impl fmt::Display for SyncRule {
    /// Postgres syntax: `ANY k ("a", "b")`, or empty when nobody is waited for. Names are
    /// double-quoted with `"` doubled, as syncrep_scanner.l reads them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.k == 0 {
            return Ok(());
        }
        write!(f, "ANY {} (", self.k)?;
        for (i, n) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "\"{}\"", n.replace('"', "\"\""))?;
        }
        f.write_str(")")
    }
}

impl Policy {
    /// A policy of the given terms (at least one).
    pub fn new(terms: Vec<Term>) -> Policy {
        Policy { terms }
    }

    /// The terms as written.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// M: how many nodes must hold a commit (the largest `any`, 1 without one).
    pub fn min_nodes(&self) -> usize {
        self.terms
            .iter()
            .filter_map(|t| match t {
                Term::Any(n) => Some(*n),
                Term::Zones(_) => None,
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Z: how many zones the holders must span (the largest `zones`, 1 without one).
    pub fn min_zones(&self) -> usize {
        self.terms
            .iter()
            .filter_map(|t| match t {
                Term::Zones(n) => Some(*n),
                Term::Any(_) => None,
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Whether a commit held by exactly `holders` (the primary among them when it holds it)
    /// is durable under this policy. A node listed twice counts once.
    pub fn satisfied(&self, holders: &[&Node]) -> bool {
        let mut names: Vec<&str> = holders.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut zones: Vec<&str> = holders.iter().map(|n| n.zone.as_str()).collect();
        zones.sort_unstable();
        zones.dedup();
        names.len() >= self.min_nodes() && zones.len() >= self.min_zones()
    }

    /// Compiles the policy for `primary` with these `standbys` (a standby named like the
    /// primary is ignored) into the rule the primary's `synchronous_standby_names` must
    /// carry. Sufficient: whenever `k` listed standbys have acknowledged, they and the
    /// primary satisfy the policy. Of the sufficient rules of this shape it picks the one
    /// that tolerates the most standbys down, then the one waiting for the fewest acks.
    ///
    /// The rule (proof in docs/policy.md): let Z be the zones needed, M the nodes needed.
    /// Without a zone term (Z = 1) list every standby, k = M - 1. Otherwise list the
    /// standbys outside the primary's zone, kz = 1 + (sizes of the Z - 2 largest of those
    /// zones) (any kz of them span at least Z - 1 zones besides the primary's), and add
    /// j = min(standbys in the primary's zone, max(0, M - 1 - kz)) of the primary's zone
    /// (they help reach M but never a zone); k = max(M - 1, j + kz).
    pub fn compile(&self, primary: &Node, standbys: &[Node]) -> Result<SyncRule, PolicyError> {
        let standbys: Vec<&Node> = standbys.iter().filter(|s| s.name != primary.name).collect();
        let m = self.min_nodes();
        let z = self.min_zones();
        let unsatisfiable = |reason: String| PolicyError::Unsatisfiable {
            policy: self.to_string(),
            primary: primary.name.clone(),
            standbys: standbys
                .iter()
                .map(|s| format!("{} ({})", s.name, s.zone))
                .collect::<Vec<_>>()
                .join(", "),
            reason,
        };
        if m - 1 > standbys.len() {
            return Err(unsatisfiable(format!(
                "{m} nodes needed, {} present",
                standbys.len() + 1
            )));
        }
        if z <= 1 {
            return Ok(SyncRule {
                k: m - 1,
                names: standbys.iter().map(|s| s.name.clone()).collect(),
            });
        }
        // Sizes of the other zones, largest first.
        let mut other_zones: BTreeMap<&str, usize> = BTreeMap::new();
        for s in standbys.iter().filter(|s| s.zone != primary.zone) {
            *other_zones.entry(s.zone.as_str()).or_default() += 1;
        }
        let mut sizes: Vec<usize> = other_zones.values().copied().collect();
        if sizes.len() < z - 1 {
            return Err(unsatisfiable(format!(
                "{z} zones needed, {} present",
                sizes.len() + 1
            )));
        }
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let kz = sizes.iter().take(z - 2).sum::<usize>() + 1;
        let same: Vec<&&Node> = standbys.iter().filter(|s| s.zone == primary.zone).collect();
        let j = same.len().min((m - 1).saturating_sub(kz));
        let k = (m - 1).max(j + kz);
        // Listed in the order given: the same-zone ones that are listed keep their place.
        let mut taken_same = 0;
        let names = standbys
            .iter()
            .filter(|s| {
                if s.zone != primary.zone {
                    true
                } else if taken_same < j {
                    taken_same += 1;
                    true
                } else {
                    false
                }
            })
            .map(|s| s.name.clone())
            .collect();
        Ok(SyncRule { k, names })
    }

    /// `compile` written as Postgres's `synchronous_standby_names` (`ANY k ("b", "c")`, or
    /// `""` when the primary waits for nobody: `any 1`).
    pub fn sync_standby_names(
        &self,
        primary: &Node,
        standbys: &[Node],
    ) -> Result<String, PolicyError> {
        Ok(self.compile(primary, standbys)?.to_string())
    }

    /// The failover rule: `recruited` (nodes that pledged to the new term) may elect without
    /// the others when they are more than half of `cohort` and the nodes of the cohort not
    /// recruited (the dead old primary among them) cannot satisfy the policy on their own:
    /// then every acknowledged commit is on some recruit. Nodes are matched by name;
    /// recruits outside the cohort do not count.
    pub fn check_recruits(&self, cohort: &[Node], recruited: &[&Node]) -> Result<(), PolicyError> {
        let is_recruited = |n: &Node| recruited.iter().any(|r| r.name == n.name);
        let in_cohort = cohort.iter().filter(|n| is_recruited(n)).count();
        if in_cohort * 2 <= cohort.len() {
            return Err(PolicyError::NoMajority {
                recruited: in_cohort,
                cohort: cohort.len(),
            });
        }
        let rest: Vec<&Node> = cohort.iter().filter(|n| !is_recruited(n)).collect();
        if self.satisfied(&rest) {
            return Err(PolicyError::RestSatisfies {
                rest: rest
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                policy: self.to_string(),
            });
        }
        Ok(())
    }

    /// `check_recruits` as a yes/no.
    pub fn recruits_enough(&self, cohort: &[Node], recruited: &[&Node]) -> bool {
        self.check_recruits(cohort, recruited).is_ok()
    }

    /// Whether losing `primary` alone can be recovered from without the operator: every
    /// other node recruited is enough. False for `any 1` (asynchronous: the dead primary
    /// alone may hold acknowledged commits).
    pub fn survives_primary_loss(&self, cohort: &[Node], primary: &str) -> bool {
        let others: Vec<&Node> = cohort.iter().filter(|n| n.name != primary).collect();
        self.recruits_enough(cohort, &others)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Any(n) => write!(f, "any {n}"),
            Term::Zones(n) => write!(f, "zones {n}"),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    /// Parses `any N`, `zones N` and their conjunctions with `and`; keywords are
    /// case-insensitive, N is a whole number of at least 1.
    fn from_str(text: &str) -> Result<Policy, PolicyError> {
        let err = |message: String| PolicyError::Parse {
            text: text.to_string(),
            message,
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() {
            return Err(err("empty".to_string()));
        }
        let mut terms = Vec::new();
        let mut rest = words.as_slice();
        loop {
            let (kind, number) = match rest {
                [kind, number, ..] => (*kind, *number),
                [kind] => {
                    return Err(err(format!("a number is missing after {kind:?}")));
                }
                [] => return Err(err("a term is missing after \"and\"".to_string())),
            };
            let n: usize = number
                .parse()
                .map_err(|_| err(format!("{number:?} is not a whole number")))?;
            if n == 0 {
                return Err(err(format!("\"{kind} 0\": the number must be at least 1")));
            }
            terms.push(match kind.to_ascii_lowercase().as_str() {
                "any" => Term::Any(n),
                "zones" => Term::Zones(n),
                _ => {
                    return Err(err(format!(
                        "unknown term {kind:?}: expected \"any\" or \"zones\""
                    )))
                }
            });
            rest = &rest[2..];
            match rest {
                [] => break,
                [and, tail @ ..] if and.eq_ignore_ascii_case("and") => rest = tail,
                [other, ..] => return Err(err(format!("expected \"and\", found {other:?}"))),
            }
        }
        Ok(Policy { terms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Policy {
        s.parse().unwrap()
    }

    fn nodes(spec: &[(&str, &str)]) -> Vec<Node> {
        spec.iter().map(|(n, z)| Node::new(*n, *z)).collect()
    }

    /// Reads back what `SyncRule`'s Display writes: `(k, names)`, `(0, [])` for empty.
    /// Written independently of `compile` so the tests check the string Postgres gets.
    fn parse_sync(s: &str) -> (usize, Vec<String>) {
        if s.is_empty() {
            return (0, Vec::new());
        }
        let rest = s.strip_prefix("ANY ").expect("ANY prefix");
        let (k, list) = rest.split_once(" (").expect("k and list");
        let list = list.strip_suffix(')').expect("closing paren");
        let names = list
            .split(", ")
            .map(|q| {
                q.strip_prefix('"')
                    .and_then(|q| q.strip_suffix('"'))
                    .expect("quoted")
                    .replace("\"\"", "\"")
            })
            .collect();
        (k.parse().expect("k"), names)
    }

    #[test]
    fn parses_and_displays() {
        for s in [
            "any 1",
            "any 2",
            "zones 2",
            "any 3 and zones 2",
            "zones 3 and any 2",
        ] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
        assert_eq!(
            p("  ANY   2  AND zones 2 ").to_string(),
            "any 2 and zones 2"
        );
        assert_eq!(p("any 3 and zones 2").min_nodes(), 3);
        assert_eq!(p("any 3 and zones 2").min_zones(), 2);
        assert_eq!(p("zones 2").min_nodes(), 1);
        assert_eq!(p("any 2 and any 4").min_nodes(), 4);
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        for (s, want) in [
            ("", "empty"),
            ("   ", "empty"),
            ("any", "a number is missing"),
            ("any two", "not a whole number"),
            ("any -1", "not a whole number"),
            ("any 0", "at least 1"),
            ("most 2", "unknown term"),
            ("any 2 zones 2", "expected \"and\""),
            ("any 2 and", "a term is missing"),
            ("any 2 or zones 2", "expected \"and\""),
        ] {
            let e = s.parse::<Policy>().unwrap_err().to_string();
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }

    #[test]
    fn satisfied_counts_nodes_and_zones() {
        let n = nodes(&[("a", "z1"), ("b", "z1"), ("c", "z2")]);
        let (a, b, c) = (&n[0], &n[1], &n[2]);
        assert!(p("any 1").satisfied(&[a]));
        assert!(!p("any 1").satisfied(&[]));
        assert!(!p("any 2").satisfied(&[a]));
        assert!(!p("any 2").satisfied(&[a, a]));
        assert!(p("any 2").satisfied(&[a, b]));
        assert!(!p("zones 2").satisfied(&[a, b]));
        assert!(p("zones 2").satisfied(&[a, c]));
        assert!(!p("any 3 and zones 2").satisfied(&[a, c]));
        assert!(!p("any 3 and zones 3").satisfied(&[a, b, c]));
        assert!(p("any 3 and zones 2").satisfied(&[a, b, c]));
    }

    #[test]
    fn compiles_simple_cases_without_needless_strength() {
        let n = nodes(&[("a", "z1"), ("b", "z1"), ("c", "z2")]);
        let (a, rest) = (&n[0], &n[1..]);
        assert_eq!(p("any 1").sync_standby_names(a, rest).unwrap(), "");
        assert_eq!(
            p("any 2").sync_standby_names(a, rest).unwrap(),
            r#"ANY 1 ("b", "c")"#
        );
        assert_eq!(
            p("any 3").sync_standby_names(a, rest).unwrap(),
            r#"ANY 2 ("b", "c")"#
        );
        // The standby in the primary's zone can never give a second zone.
        assert_eq!(
            p("zones 2").sync_standby_names(a, rest).unwrap(),
            r#"ANY 1 ("c")"#
        );
        // Three nodes with a second zone: c is needed for the zone, b or c for the count...
        // but any 2 acks among (b, c) is what covers both.
        assert_eq!(
            p("any 3 and zones 2").sync_standby_names(a, rest).unwrap(),
            r#"ANY 2 ("b", "c")"#
        );
        // The primary itself in the list is ignored.
        assert_eq!(
            p("any 2").sync_standby_names(a, &n).unwrap(),
            r#"ANY 1 ("b", "c")"#
        );
        // Quotes in names are doubled.
        let q = nodes(&[("p", "z"), ("we\"ird", "z")]);
        assert_eq!(
            p("any 2").sync_standby_names(&q[0], &q[1..]).unwrap(),
            r#"ANY 1 ("we""ird")"#
        );
        // Three zones of two: any 3 acks from the other zones span both of them.
        let six = nodes(&[
            ("a", "z1"),
            ("b", "z1"),
            ("c", "z2"),
            ("d", "z2"),
            ("e", "z3"),
            ("f", "z3"),
        ]);
        assert_eq!(
            p("zones 3").sync_standby_names(&six[0], &six[1..]).unwrap(),
            r#"ANY 3 ("c", "d", "e", "f")"#
        );
    }

    #[test]
    fn unsatisfiable_policies_are_errors() {
        let n = nodes(&[("a", "z1"), ("b", "z1"), ("c", "z2")]);
        for s in ["any 4", "zones 3", "any 4 and zones 2"] {
            let e = p(s).sync_standby_names(&n[0], &n[1..]).unwrap_err();
            assert!(matches!(e, PolicyError::Unsatisfiable { .. }), "{s}: {e:?}");
        }
        let one_zone = nodes(&[("a", "z"), ("b", "z")]);
        assert!(p("zones 2")
            .sync_standby_names(&one_zone[0], &one_zone[1..])
            .is_err());
    }

    /// Every cluster of 1..=6 nodes over up to 3 zones, every primary, every policy up to
    /// `any 7 and zones 4`: the compiled expression is sufficient (every set of acking
    /// standbys that meets it satisfies the policy with the primary), tight (one ack fewer
    /// can fail it), and an error exactly when the whole cluster cannot satisfy the policy.
    #[test]
    fn compiled_rule_is_sufficient_exhaustively() {
        let zone_names = ["z1", "z2", "z3"];
        let mut policies = Vec::new();
        for z in 2..=4 {
            policies.push(Policy::new(vec![Term::Zones(z)]));
        }
        for m in 1..=7 {
            policies.push(Policy::new(vec![Term::Any(m)]));
            for z in 2..=4 {
                policies.push(Policy::new(vec![Term::Any(m), Term::Zones(z)]));
            }
        }
        let mut checked_sets = 0u64;
        for size in 1..=6usize {
            for assignment in 0..3usize.pow(size as u32) {
                let mut a = assignment;
                let cluster: Vec<Node> = (0..size)
                    .map(|i| {
                        let z = zone_names[a % 3];
                        a /= 3;
                        Node::new(format!("n{i}"), z)
                    })
                    .collect();
                for pi in 0..size {
                    let primary = &cluster[pi];
                    let standbys: Vec<Node> = cluster
                        .iter()
                        .filter(|n| n.name != primary.name)
                        .cloned()
                        .collect();
                    let everyone: Vec<&Node> = cluster.iter().collect();
                    for policy in &policies {
                        let text = match policy.sync_standby_names(primary, &standbys) {
                            Ok(t) => t,
                            Err(e) => {
                                assert!(
                                    !policy.satisfied(&everyone),
                                    "{policy} over {cluster:?} (primary {pi}) refused: {e}"
                                );
                                continue;
                            }
                        };
                        assert!(policy.satisfied(&everyone));
                        let (k, listed) = parse_sync(&text);
                        assert!(k <= listed.len(), "{policy}: {text}");
                        let mut tight = k == 0;
                        for mask in 0..(1u32 << standbys.len()) {
                            let acks: Vec<&Node> = standbys
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| mask & (1 << i) != 0)
                                .map(|(_, n)| n)
                                .collect();
                            let listed_acks =
                                acks.iter().filter(|n| listed.contains(&n.name)).count();
                            let mut holders = acks.clone();
                            holders.push(primary);
                            let ok = policy.satisfied(&holders);
                            checked_sets += 1;
                            if listed_acks >= k {
                                assert!(
                                    ok,
                                    "{policy} over {cluster:?}, primary {pi}: {text} met by {acks:?} but not durable"
                                );
                            }
                            if k > 0
                                && listed_acks == k - 1
                                && acks.iter().all(|n| listed.contains(&n.name))
                                && !ok
                            {
                                tight = true;
                            }
                        }
                        assert!(
                            tight,
                            "{policy} over {cluster:?}, primary {pi}: {text} is stronger than needed"
                        );
                    }
                }
            }
        }
        assert!(checked_sets > 1_000_000, "{checked_sets}");
    }

    #[test]
    fn recruits_any_2_of_3() {
        let c = nodes(&[("a", "z"), ("b", "z"), ("c", "z")]);
        let any2 = p("any 2");
        // a (the old primary) is dead.
        assert!(any2.recruits_enough(&c, &[&c[1], &c[2]]));
        assert!(!any2.recruits_enough(&c, &[&c[1]]));
        assert!(matches!(
            any2.check_recruits(&c, &[&c[1]]),
            Err(PolicyError::NoMajority {
                recruited: 1,
                cohort: 3
            })
        ));
        // Asynchronous: the dead primary alone may hold acknowledged commits.
        assert!(!p("any 1").recruits_enough(&c, &[&c[1], &c[2]]));
        assert!(!p("any 1").survives_primary_loss(&c, "a"));
        assert!(any2.survives_primary_loss(&c, "a"));
    }

    #[test]
    fn recruits_any_3_of_5() {
        let c = nodes(&[("a", "z"), ("b", "z"), ("c", "z"), ("d", "z"), ("e", "z")]);
        let any3 = p("any 3");
        // Three recruits: a majority, and the other two (a dead, plus one) are fewer than 3.
        assert!(any3.recruits_enough(&c, &[&c[1], &c[2], &c[3]]));
        assert!(any3.recruits_enough(&c, &[&c[1], &c[2], &c[3], &c[4]]));
        assert!(!any3.recruits_enough(&c, &[&c[1], &c[2]]));
        // `any 2` over 5: three recruits leave two who could have acknowledged alone.
        let any2 = p("any 2");
        assert!(matches!(
            any2.check_recruits(&c, &[&c[1], &c[2], &c[3]]),
            Err(PolicyError::RestSatisfies { .. })
        ));
        assert!(any2.recruits_enough(&c, &[&c[1], &c[2], &c[3], &c[4]]));
        // Names outside the cohort do not count towards the majority.
        let stranger = Node::new("x", "z");
        assert!(!any3.recruits_enough(&c, &[&c[1], &c[2], &stranger]));
    }

    #[test]
    fn recruits_zones() {
        // a (dead primary) and b in z1, c and d in z2, e in z3.
        let c = nodes(&[
            ("a", "z1"),
            ("b", "z1"),
            ("c", "z2"),
            ("d", "z2"),
            ("e", "z3"),
        ]);
        let zones2 = p("zones 2");
        // Rest {a, b}: one zone, cannot have acknowledged alone.
        assert!(zones2.recruits_enough(&c, &[&c[2], &c[3], &c[4]]));
        // Rest {a, c}: two zones, could have.
        assert!(!zones2.recruits_enough(&c, &[&c[1], &c[3], &c[4]]));
        // Rest {a, e}: also two zones.
        assert!(!zones2.recruits_enough(&c, &[&c[1], &c[2], &c[3]]));
        // Under zones 3 the rest {a, c} (two zones) is not enough on its own.
        assert!(p("zones 3").recruits_enough(&c, &[&c[1], &c[3], &c[4]]));
    }
}
