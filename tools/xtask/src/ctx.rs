//! What every `cargo xtask test` step gets ([`Ctx`]) and may call
//! ([`cargo`]). The step list (test.rs) imports the steps; the steps
//! import this, not the list.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::{self, Image};

/// Shared state of one test run (the image is built once).
pub struct Ctx {
    pub long: bool,
    /// `--seed`: replay the failover runs of an earlier run (each run
    /// prints its seed); without it each failover step draws a new one.
    pub seed: Option<u64>,
    image: Option<Image>,
}

impl Ctx {
    pub fn new(long: bool, seed: Option<u64>) -> Self {
        Self {
            long,
            seed,
            image: None,
        }
    }

    pub fn image(&mut self) -> Result<Image> {
        if let Some(i) = &self.image {
            return Ok(i.clone());
        }
        let i = image::build()?;
        self.image = Some(i.clone());
        Ok(i)
    }
}

/// Run a command in the workspace root; fail with its output's tail.
pub fn cargo(args: &[&str]) -> Result<String> {
    cargo_env(args, &[])
}

/// As [`cargo`], with extra environment variables.
pub fn cargo_env(args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(crate::root())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("cargo {} failed:\n{}", args.join(" "), tail.join("\n"));
    }
    Ok(text)
}
