//! `mesh policy sign | apply | show`: who may write what.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use mesh_core::{PolicyOffer, PolicyView};
use serde_json::Value;

use super::Context;
use super::output::{print_or, short};
use crate::client::ClientError;
use crate::config;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Sign a policy (TOML, see examples/policy.toml) with the org key.
    Sign {
        /// The policy file.
        policy: PathBuf,
        /// The org key file from `mesh org init`.
        #[arg(long)]
        org_key: PathBuf,
        /// Where to write the signed policy.
        #[arg(long)]
        out: PathBuf,
    },
    /// Hand a signed policy to the running node, which enforces it and spreads it to its
    /// peers (it must be signed by the org the node trusts and newer than its own).
    Apply {
        /// The signed policy file from `mesh policy sign`.
        file: PathBuf,
    },
    /// The policy in force: members, roles, who may write what.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    match args.command {
        Command::Sign {
            policy,
            org_key,
            out,
        } => {
            let signed = config::sign_policy(&policy, &org_key)?;
            std::fs::write(&out, signed)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("signed {} into {}", policy.display(), out.display());
            Ok(())
        }
        Command::Apply { file } => apply(context, &file),
        Command::Show { json } => match context.client()?.get_as::<PolicyView>("/v1/policy") {
            Ok(policy) => {
                print_or(json, &policy, print_policy);
                Ok(())
            }
            // No policy: JSON readers get `null` (and the exit code 1 of "not found").
            Err(ClientError::NotFound(message)) if json => {
                out!("null");
                Err(ClientError::NotFound(message))
            }
            Err(error) => Err(error),
        },
    }
}

fn apply(context: &Context, file: &std::path::Path) -> Result<(), ClientError> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signed: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a signed policy; make one with `mesh policy sign`",
            file.display()
        )
    })?;
    let offer: PolicyOffer = context.client()?.send_as("POST", "/v1/policy", &signed)?;
    match offer {
        PolicyOffer::Adopted { version } => {
            out!("policy version {version} is in force and spreading to peers")
        }
        PolicyOffer::Unchanged { version } => {
            out!("policy version {version} was already in force")
        }
        PolicyOffer::Older { in_force } => {
            let offered = signed["policy"]
                .as_str()
                .and_then(|policy| serde_json::from_str::<Value>(policy).ok())
                .and_then(|policy| policy["version"].as_u64());
            let message = if offered == Some(in_force) {
                format!(
                    "not applied: a different policy of the same version {in_force} is in force and wins the tie (the lower hash wins on every node; status shows the conflict); raise `version` and sign again"
                )
            } else {
                format!(
                    "not applied: the node enforces a newer policy (version {in_force}); raise `version` and sign again"
                )
            };
            return Err(anyhow!(message).into());
        }
    }
    Ok(())
}

fn print_policy(view: &PolicyView) {
    let policy = &view.policy;
    out!(
        "policy version {}  (hash {}…)",
        view.version,
        short(Some(&view.hash), 16)
    );
    out!("members");
    for (name, member) in &policy.members {
        let roles: Vec<&str> = member.roles.iter().map(String::as_str).collect();
        out!("  {:<16} {:<24} {}", name, roles.join(","), member.node);
    }
    if !policy.revoked.is_empty() {
        out!("revoked");
        for node in &policy.revoked {
            out!("  {node}");
        }
    }
    out!("collections (others: any member may write)");
    for (name, rule) in &policy.collections {
        let writers: Vec<&str> = rule.writers.iter().map(String::as_str).collect();
        out!(
            "  {:<16} written by {}{}",
            name,
            writers.join(", "),
            if rule.schema.is_none() {
                ""
            } else {
                "; has a field schema"
            }
        );
    }
    if let Some(conflict) = &view.conflict {
        out!(
            "WARNING another policy also claims version {}; the lower hash is in force",
            conflict.version
        );
    }
}
