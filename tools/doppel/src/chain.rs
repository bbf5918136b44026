//! A chain A -> B -> C (`doppel backup --standby-ram ... --then-backup
//! ADDR`): once B's standby is activated (A lost), B protects its own
//! machine to the next backup C exactly as `doppel primary --backup ADDR
//! --serve-clients` does, through the same code (`primary_cmd::protect_attached`,
//! with `doppel primary`'s own defaults, parsed from its command line), on
//! the command ring B's backup tool already holds (the one `Activate` went
//! through). The hypervisor accepts `LogDirtyEnable` on an activated
//! standby (and still refuses it before `Activate`): from then on its
//! output is held until `CommitEpoch`, as at any primary.

use std::path::Path;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::args::PrimaryArgs;
use crate::cli::ClientSide;
use crate::primary_cmd;
use doppel::primary::Primary;
use doppel::witness::Gate;

/// `doppel primary`'s arguments, parsed as its command line.
#[derive(Parser, Debug)]
struct AsPrimary {
    #[command(flatten)]
    args: PrimaryArgs,
}

/// What `--then-backup` asks for: `doppel primary`'s run, prepared.
#[derive(Debug)]
pub(crate) struct Then {
    args: PrimaryArgs,
}

impl Then {
    /// `None` without `--then-backup`. `machine` is the standby's RAM file,
    /// `clients` the address its clients are served on (already bound).
    /// Refuses (usage error) what `doppel primary` would refuse.
    pub(crate) fn new(
        next: Option<&str>,
        machine: &Path,
        clients: &str,
    ) -> Result<Option<Self>, (String, u8)> {
        let Some(next) = next else {
            return Ok(None);
        };
        let line = [
            "doppel primary",
            "--machine-ram",
            &machine.display().to_string(),
            "--backup",
            next,
            "--serve-clients",
            clients,
        ];
        let m = AsPrimary::command()
            .try_get_matches_from(line)
            .map_err(|e| (format!("--then-backup: {e}"), 2))?;
        let args = AsPrimary::from_arg_matches(&m)
            .map_err(|e| (format!("--then-backup: {e}"), 2))?
            .args;
        Ok(Some(Self { args }))
    }

    /// Protect the activated standby (`p`: the tool's end of its rings,
    /// `Activate` answered) to the next backup, serving `clients`. Returns
    /// as `doppel primary` does.
    pub(crate) fn protect(
        self,
        mut p: Primary<'_>,
        clients: ClientSide<'_>,
        gate: Option<Gate>,
    ) -> Result<(), (String, u8)> {
        // `doppel primary`'s timeouts, not those `Activate` was sent with;
        // with a witness, the lease this side took before activating.
        let mut cfg = self.args.primary_config(None);
        cfg.gate = gate;
        p.reconfigure(cfg);
        println!(
            "chain: protecting the activated standby to {}",
            self.args.backup_addr()
        );
        // The link to the next backup is plain TCP (warned about): the
        // TLS flags are not passed on to it (yet).
        let tls = self.args.link_tls()?;
        primary_cmd::protect_attached(&self.args, p, Some(clients), tls.map(std::sync::Arc::new))
    }
}
