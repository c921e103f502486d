//! `mesh policy sign | apply | show`: who may write what.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
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
        Command::Show { json } => match context.client()?.get("/v1/policy") {
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
    let offer = context.client()?.send("POST", "/v1/policy", &signed)?;
    match offer["outcome"].as_str() {
        Some("adopted") => out!(
            "policy version {} is in force and spreading to peers",
            offer["version"]
        ),
        Some("unchanged") => {
            out!("policy version {} was already in force", offer["version"])
        }
        _ => {
            let offered = signed["policy"]
                .as_str()
                .and_then(|policy| serde_json::from_str::<Value>(policy).ok())
                .map(|policy| policy["version"].clone());
            let message = if offered.as_ref() == Some(&offer["in_force"]) {
                format!(
                    "not applied: a different policy of the same version {} is in force and wins the tie (the lower hash wins on every node; status shows the conflict); raise `version` and sign again",
                    offer["in_force"]
                )
            } else {
                format!(
                    "not applied: the node enforces a newer policy (version {}); raise `version` and sign again",
                    offer["in_force"]
                )
            };
            return Err(anyhow!(message).into());
        }
    }
    Ok(())
}

fn print_policy(view: &Value) {
    let policy = &view["policy"];
    out!(
        "policy version {}  (hash {}…)",
        view["version"],
        short(view["hash"].as_str(), 16)
    );
    out!("members");
    if let Some(members) = policy["members"].as_object() {
        for (name, member) in members {
            let roles: Vec<&str> = member["roles"]
                .as_array()
                .map(|roles| roles.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out!(
                "  {:<16} {:<24} {}",
                name,
                roles.join(","),
                member["node"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(revoked) = policy["revoked"].as_array().filter(|list| !list.is_empty()) {
        out!("revoked");
        for node in revoked {
            out!("  {}", node.as_str().unwrap_or("?"));
        }
    }
    out!("collections (others: any member may write)");
    if let Some(collections) = policy["collections"].as_object() {
        for (name, rule) in collections {
            let writers: Vec<&str> = rule["writers"]
                .as_array()
                .map(|roles| roles.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out!(
                "  {:<16} written by {}{}",
                name,
                writers.join(", "),
                if rule["schema"].is_null() {
                    ""
                } else {
                    "; has a field schema"
                }
            );
        }
    }
    if let Some(conflict) = view["conflict"].as_object() {
        out!(
            "WARNING another policy also claims version {}; the lower hash is in force",
            conflict["version"]
        );
    }
}
