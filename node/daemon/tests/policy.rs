//! The org's policy with real daemons: head office as master, two clinics as sites, a
//! stranger, and a clinic demoted while it was cut off. Loopback only; every wait polls
//! with a deadline; every daemon is killed on drop.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Makes an org key `file` in `work` (created if needed); returns the org id.
fn org_init(work: &Path, file: &str) -> String {
    std::fs::create_dir_all(work).unwrap();
    let key = work.join(file);
    mesh_ok(work, &["org", "init", "--out", key.to_str().unwrap()])
        .trim()
        .to_owned()
}

fn init_member(dir: &Path, name: &str, org: &str) -> String {
    init_with(dir, name, &["--org", org])
}

/// Writes and signs a policy; returns the signed file.
fn sign(work: &Path, version: u64, members: &[(&str, &str, &str)]) -> String {
    let mut toml = format!("version = {version}\n");
    for (name, node, role) in members {
        toml.push_str(&format!(
            "[members.{name}]\nnode = \"{node}\"\nroles = [\"{role}\"]\n"
        ));
    }
    toml.push_str("[collections.catalogue]\nwriters = [\"master\"]\n");
    toml.push_str("[collections.stock]\nwriters = [\"master\", \"site\"]\n");
    let source = work.join(format!("policy-v{version}.toml"));
    std::fs::write(&source, toml).unwrap();
    let signed = work.join(format!("policy-v{version}.signed"));
    mesh_ok(
        work,
        &[
            "policy",
            "sign",
            source.to_str().unwrap(),
            "--org-key",
            work.join("org.key").to_str().unwrap(),
            "--out",
            signed.to_str().unwrap(),
        ],
    );
    signed.to_str().unwrap().to_owned()
}

fn field(dir: &Path, collection: &str, id: &str, name: &str) -> Option<Value> {
    let output = mesh(dir, &["get", collection, id, "--json"]);
    if !output.status.success() {
        return None;
    }
    let record: Value = serde_json::from_slice(&output.stdout).ok()?;
    let value = record["fields"][name].clone();
    (!value.is_null()).then_some(value)
}

fn quarantine(dir: &Path) -> Vec<Value> {
    let rows: Value = serde_json::from_str(&mesh_ok(dir, &["quarantine", "--json"])).unwrap();
    rows["quarantine"].as_array().cloned().unwrap_or_default()
}

fn digests_equal(dirs: &[&Path]) -> bool {
    let digests: Vec<Value> = dirs
        .iter()
        .map(|dir| status(dir)["digest"].clone())
        .collect();
    digests.iter().all(|digest| digest == &digests[0])
}

#[test]
fn head_office_masters_reference_data_and_a_demoted_clinic_loses_what_it_wrote_cut_off() {
    let work = TempDir::new("policy-work");
    let org = org_init(&work.0, "org.key");
    let [hq, clinic1, clinic2, stranger] = [
        TempDir::new("policy-hq"),
        TempDir::new("policy-clinic1"),
        TempDir::new("policy-clinic2"),
        TempDir::new("policy-stranger"),
    ];
    let hq_id = init_member(&hq.0, "hq", &org);
    let clinic1_id = init_member(&clinic1.0, "clinic1", &org);
    let clinic2_id = init_member(&clinic2.0, "clinic2", &org);
    let stranger_id = init_member(&stranger.0, "stranger", &org);
    let v1 = sign(
        &work.0,
        1,
        &[
            ("hq", &hq_id, "master"),
            ("clinic1", &clinic1_id, "master"),
            ("clinic2", &clinic2_id, "site"),
        ],
    );

    let _hq_daemon = start(&hq.0);
    let hq_addr = listen_addr(&hq.0);
    let mut clinic1_daemon = start_with_peers(&clinic1.0, std::slice::from_ref(&hq_addr));
    let _clinic2_daemon = start_with_peers(&clinic2.0, std::slice::from_ref(&hq_addr));
    let applied = mesh_ok(&hq.0, &["policy", "apply", &v1]);
    assert!(applied.contains("version 1 is in force"), "{applied}");

    // The policy applied at hq reaches both clinics.
    for clinic in [&clinic1.0, &clinic2.0] {
        eventually("the policy to reach the clinic", || {
            (status(clinic)["policy"]["version"] == 1).then_some(())
        });
    }
    let shown: Value = serde_json::from_str(&mesh_ok(&clinic2.0, &["policy", "show", "--json"]))
        .expect("policy show prints JSON");
    assert_eq!(shown["policy"]["members"]["hq"]["node"], hq_id.as_str());

    // hq's catalogue record reaches both clinics.
    mesh_ok(
        &hq.0,
        &["put", "catalogue", "aspirin", "name=Aspirin", "price=1.5"],
    );
    for clinic in [&clinic1.0, &clinic2.0] {
        eventually("the catalogue record to reach the clinic", || {
            field(clinic, "catalogue", "aspirin", "name")
        });
    }

    // A site's catalogue write is refused, naming the rule, and nothing changes anywhere.
    let refused = mesh(&clinic2.0, &["put", "catalogue", "aspirin", "price=0.1"]);
    assert_eq!(refused.status.code(), Some(2));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("`clinic2` may not write `catalogue`") && message.contains("policy"),
        "{message}"
    );
    eventually("digests to agree", || {
        digests_equal(&[&hq.0, &clinic1.0, &clinic2.0]).then_some(())
    });
    for dir in [&hq.0, &clinic1.0, &clinic2.0] {
        assert_eq!(
            field(dir, "catalogue", "aspirin", "price"),
            Some(Value::from(1.5))
        );
    }

    // Each clinic's own records reach hq.
    mesh_ok(&clinic1.0, &["put", "stock", "c1-aspirin", "count=10"]);
    mesh_ok(&clinic2.0, &["put", "stock", "c2-aspirin", "count=20"]);
    for id in ["c1-aspirin", "c2-aspirin"] {
        eventually("a clinic's stock to reach hq", || {
            field(&hq.0, "stock", id, "count")
        });
    }

    // A node that is not a member cannot connect.
    let _stranger_daemon = start_with_peers(&stranger.0, std::slice::from_ref(&hq_addr));
    eventually("hq to list the refused stranger", || {
        status(&hq.0)["refused_connections"]
            .as_array()?
            .iter()
            .any(|row| row["peer_id"] == stranger_id.as_str())
            .then_some(())
    });
    assert!(field(&stranger.0, "catalogue", "aspirin", "name").is_none());
    assert!(
        status(&stranger.0)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|peer| peer["state"] != "connected")
    );

    // While master, clinic1 writes reference data that everyone sees.
    mesh_ok(&clinic1.0, &["put", "catalogue", "early", "name=Early"]);
    eventually("clinic1's early record to reach hq", || {
        field(&hq.0, "catalogue", "early", "name")
    });

    // clinic1 is cut off (restarted with no peers; nobody dials it) and keeps writing as a
    // master, while hq demotes it in version 2.
    drop(clinic1_daemon);
    let isolated = start(&clinic1.0);
    mesh_ok(&clinic1.0, &["put", "catalogue", "late", "name=Late"]);
    mesh_ok(&clinic1.0, &["put", "catalogue", "early", "name=Changed"]);
    assert!(field(&clinic1.0, "catalogue", "late", "name").is_some());
    let v2 = sign(
        &work.0,
        2,
        &[
            ("hq", &hq_id, "master"),
            ("clinic1", &clinic1_id, "site"),
            ("clinic2", &clinic2_id, "site"),
        ],
    );
    mesh_ok(&hq.0, &["policy", "apply", &v2]);
    eventually("version 2 to reach clinic2", || {
        (status(&clinic2.0)["policy"]["version"] == 2).then_some(())
    });

    // It reconnects: its cut-off changes are rejected on every node.
    drop(isolated);
    clinic1_daemon = start_with_peers(&clinic1.0, std::slice::from_ref(&hq_addr));
    let dirs: [&Path; 3] = [&hq.0, &clinic1.0, &clinic2.0];
    eventually(
        "every node to hold clinic1's cut-off changes in quarantine",
        || {
            let _ = mesh(&hq.0, &["sync", "now"]);
            dirs.iter()
                .all(|dir| {
                    quarantine(dir).len() == 2
                        && field(dir, "catalogue", "late", "name").is_none()
                        && field(dir, "catalogue", "early", "name") == Some(Value::from("Early"))
                })
                .then_some(())
        },
    );
    eventually("all digests to be equal", || {
        digests_equal(&dirs).then_some(())
    });
    for dir in dirs {
        let rows = quarantine(dir);
        assert!(
            rows.iter().all(|row| row["author"] == clinic1_id.as_str()
                && row["reason"]["rule"] == "may_not_write"),
            "{rows:?}"
        );
    }
    let clinic_status = status(&clinic1.0);
    assert_eq!(clinic_status["policy"]["version"], 2);
    let own = clinic_status["own_changes_rejected"].as_array().unwrap();
    assert!(
        own.iter()
            .filter(|row| row["rejected_by"] == clinic1_id.as_str())
            .count()
            >= 2,
        "the clinic shows its own rejected changes: {own:?}"
    );
    let text = mesh_ok(&clinic1.0, &["status"]);
    assert!(text.contains("own changes rejected"), "{text}");
    drop(clinic1_daemon);
}

#[test]
fn an_acknowledged_policy_survives_a_kill_and_a_node_will_not_start_open_without_it() {
    let work = TempDir::new("policy-guard-work");
    let org = org_init(&work.0, "org.key");
    let other = org_init(&work.0, "other.key");
    let node = TempDir::new("policy-guard-node");
    let node_id = init_member(&node.0, "hq", &org);
    let v1 = sign(&work.0, 1, &[("hq", &node_id, "master")]);

    // Killed right after the policy is acknowledged, the node restarts with it.
    let mut daemon = start(&node.0);
    mesh_ok(&node.0, &["policy", "apply", &v1]);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let daemon = start(&node.0);
    assert_eq!(status(&node.0)["policy"]["version"], 1);
    drop(daemon);

    // The stored policy is not the configured org's (the config was edited to trust
    // another org): the node refuses to start rather than run open to every key.
    let config_path = node.0.join("config.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains(&org), "{config}");
    std::fs::write(&config_path, config.replace(&org, &other)).unwrap();
    let output = mesh(&node.0, &["node", "run"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("will not start open without it"),
        "{stderr}"
    );
}

#[test]
fn a_node_made_with_a_policy_enforces_it_from_its_first_start() {
    let work = TempDir::new("policy-init-work");
    let org = org_init(&work.0, "org.key");
    let hq = TempDir::new("policy-init-hq");
    let hq_id = init_member(&hq.0, "hq", &org);
    let v1 = sign(&work.0, 1, &[("hq", &hq_id, "master")]);

    // A policy of another org is refused, and no node is left half made.
    let other = TempDir::new("policy-init-other");
    let other_org = org_init(&other.0, "org.key");
    let wrong = TempDir::new("policy-init-wrong");
    let refused = mesh(
        &wrong.0,
        &["init", "--org", &other_org, "--policy", &v1, "--no-mdns"],
    );
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot be enforced"), "{stderr}");
    assert!(!wrong.0.join("config.toml").exists());

    // Made with the org's policy, a new clinic enforces it before any peer connects.
    let clinic = TempDir::new("policy-init-clinic");
    init_with(&clinic.0, "clinic", &["--org", &org, "--policy", &v1]);
    let _clinic = start(&clinic.0);
    assert_eq!(status(&clinic.0)["policy"]["version"], 1);
}
