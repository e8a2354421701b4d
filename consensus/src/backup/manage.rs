//! `tidepool backup list | verify | expire`: commands on the repository alone (no Postgres
//! needs to run). They use DIR/pgbackrest/repo.conf, rewritten each time from the current
//! `[backup]` settings, so a retention changed in the config file applies at the next expire.

use crate::backup::{info, Backups, PgBackRest};
use crate::cli::{BackupListArgs, GlobalArgs};
use crate::cluster::Context;
use crate::error::{Error, Result};
use crate::state::State;

/// The cluster's state, with `[backup]` from --config (if given) over what `up` remembered.
pub fn load_state(global: &GlobalArgs) -> Result<State> {
    let ctx = Context::load_dir(global)?;
    let mut state = State::load(&ctx.layout.state_file())?
        .ok_or_else(|| Error::NoCluster(ctx.layout.dir().to_path_buf()))?;
    if let Some(b) = &ctx.overrides.backup {
        state.settings.backup = b.clone();
    }
    Ok(state)
}

/// pgBackRest on the repository: pg1 is node1 (repository commands never connect to it).
pub fn repo(state: &State) -> Result<(Backups, PgBackRest)> {
    let backups = Backups::of(state)?;
    let nodes = super::nodes_of(state)?;
    let Some(node1) = nodes.first() else {
        return Err(Error::Conflict("the cluster has no nodes".into()));
    };
    let path = backups.dir.join("repo.conf");
    let text = super::pgbackrest::render(
        &backups.settings,
        &backups.paths,
        &backups.stanza,
        &[super::PgHost {
            data_dir: node1.data_dir.clone(),
            port: node1.pg_port,
            socket_dir: node1.socket_dir.clone(),
        }],
        &[],
    );
    super::write_config(&path, &text)?;
    let pb = PgBackRest::new(&path, &backups.stanza);
    Ok((backups, pb))
}

pub fn list(global: &GlobalArgs, args: &BackupListArgs) -> Result<bool> {
    let state = load_state(global)?;
    let (_, pb) = repo(&state)?;
    let stanza = info::stanza(&pb)?;
    if args.json {
        println!("{}", super::create::to_json(&stanza)?);
        return Ok(true);
    }
    println!(
        "stanza {} ({}), WAL archived {} .. {}{}",
        pb.stanza,
        stanza.status,
        stanza.wal_min.as_deref().unwrap_or("-"),
        stanza.wal_max.as_deref().unwrap_or("-"),
        if stanza.backup_running {
            ", a backup is running"
        } else {
            ""
        }
    );
    println!(
        "{:<34} {:<4} {:<23} {:<23} {:>9} {:>9}  WAL",
        "LABEL", "TYPE", "START", "STOP", "DATABASE", "STORED"
    );
    for b in &stanza.backups {
        println!(
            "{:<34} {:<4} {:<23} {:<23} {:>9} {:>9}  {} .. {}{}",
            b.label,
            b.kind,
            info::utc(b.start),
            info::utc(b.stop),
            info::human(b.database_size),
            info::human(b.repo_size),
            b.wal_start,
            b.wal_stop,
            if b.error { "  (error)" } else { "" }
        );
    }
    Ok(true)
}

/// What `pgbackrest verify` found (2.45 reports problems in its INFO log and still exits 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub report: String,
}

pub fn verdict(output: &str) -> Verdict {
    // The report starts at "stanza:"; each problem line is a count ("checksum invalid: 1",
    // "missing: 2", ...) under a "status: error" backup or archive id.
    let report: Vec<&str> = output
        .lines()
        .skip_while(|l| !l.contains("stanza:"))
        .take_while(|l| !l.contains("verify command end"))
        .map(|l| l.split_once("INFO: ").map(|(_, r)| r).unwrap_or(l).trim())
        .collect();
    let ok = !report
        .iter()
        .any(|l| l.contains("status: error") || l.contains("invalid"));
    Verdict {
        ok,
        report: report.join("\n"),
    }
}

pub fn verify(global: &GlobalArgs) -> Result<bool> {
    let state = load_state(global)?;
    let (_, pb) = repo(&state)?;
    let out = pb.run("verify", &["--log-level-console=info".to_string()])?;
    let v = verdict(&out);
    if v.ok {
        println!(
            "verify: every backup and archived WAL file matches its checksum\n{}",
            v.report
        );
        Ok(true)
    } else {
        tracing::error!(report = %v.report, "verify found damaged files");
        Err(Error::Backup(format!(
            "verify found damaged or missing files in the repository:\n{}",
            v.report
        )))
    }
}

pub fn expire(global: &GlobalArgs) -> Result<bool> {
    let state = load_state(global)?;
    let (backups, pb) = repo(&state)?;
    let before = info::backups(&pb)?;
    pb.run("expire", &[])?;
    let after = info::backups(&pb)?;
    let gone: Vec<&str> = before
        .iter()
        .filter(|b| !after.iter().any(|a| a.label == b.label))
        .map(|b| b.label.as_str())
        .collect();
    println!(
        "expire (keep {} full, by {}): {} removed{}{}; {} kept",
        backups.settings.retention_full,
        backups.settings.retention_full_type,
        gone.len(),
        if gone.is_empty() { "" } else { ": " },
        gone.join(", "),
        after.len()
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_output_is_judged_by_its_report() {
        let bad = "P00   INFO: verify command begin 2.45: --stanza=tp\n\
                   P00   INFO: stanza: tp\n\
                   \x20  status: error\n\
                   \x20    backup: 20261206-200937F, status: invalid, total files checked: 964, total valid files: 963\n\
                   \x20      checksum invalid: 1\n\
                   P00   INFO: verify command end: completed successfully (202ms)\n";
        let v = verdict(bad);
        assert!(!v.ok);
        assert!(v.report.contains("checksum invalid: 1"), "{}", v.report);
        let good = "P00   INFO: stanza: tp\n    status: ok\nP00   INFO: verify command end: completed successfully\n";
        assert!(verdict(good).ok);
    }
}
