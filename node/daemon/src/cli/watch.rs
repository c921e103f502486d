//! `mesh watch`: record changes as they happen.

use serde_json::Value;

use super::Context;
use super::output::short;
use crate::client::ClientError;

#[derive(clap::Args)]
pub struct Args {
    /// Only this collection.
    collection: Option<String>,
    /// Print each change as a line of JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let Args { collection, json } = args;
    let client = context.client()?;
    if let Some(collection) = &collection {
        crdt_schema::record::check_collection(collection).map_err(anyhow::Error::from)?;
    }
    let path = match &collection {
        Some(collection) => format!("/v1/changes?collection={collection}"),
        None => "/v1/changes".to_owned(),
    };
    eprintln!(
        "watching {}; Ctrl-C stops",
        collection.as_deref().unwrap_or("every collection")
    );
    client.follow(&path, |line| {
        if json {
            out!("{line}");
            return;
        }
        let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        match event["record"].as_str() {
            Some(record) => out!("{}", describe(record, &event)),
            None => out!("{line}"),
        }
    })?;
    Ok(())
}

/// One feed event in words: `stock/x deleted by clinic-2 (via hq)`.
fn describe(record: &str, event: &Value) -> String {
    let verb = if event["deleted"] == true {
        "deleted"
    } else {
        "changed"
    };
    let named = |name: &Value, id: &Value| -> String {
        name.as_str()
            .map(str::to_owned)
            .or_else(|| id.as_str().map(|id| short(Some(id), 16).to_owned() + "…"))
            .unwrap_or_else(|| "?".to_owned())
    };
    let authors: Vec<String> = event["authors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|author| named(&author["name"], &author["id"]))
        .collect();
    let by = match authors.as_slice() {
        [] => " (the policy in force changed what is accepted)".to_owned(),
        names => format!(" by {}", names.join(", ")),
    };
    let via = match event["from"].as_str() {
        None => String::new(),
        Some(_) => {
            let peer = named(&event["from_name"], &event["from"]);
            if authors.contains(&peer) {
                String::new()
            } else {
                format!(" (via {peer})")
            }
        }
    };
    format!("{record} {verb}{by}{via}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_change_is_told_with_its_verb_authors_and_relay() {
        let event = json!({
            "record": "stock/a", "deleted": true, "from": "12D3KooWPeerOfHq", "from_name": "hq",
            "authors": [{"id": "12D3KooWClinic2", "name": "clinic-2"}],
        });
        assert_eq!(
            super::describe("stock/a", &event),
            "stock/a deleted by clinic-2 (via hq)"
        );
        let local = json!({
            "record": "stock/a", "deleted": false, "from": null,
            "authors": [{"id": "12D3KooWMe", "name": "this node"}],
        });
        assert_eq!(
            super::describe("stock/a", &local),
            "stock/a changed by this node"
        );
        let unnamed = json!({
            "record": "stock/a", "deleted": false, "from": "12D3KooWAbcdefghijklmnop",
            "authors": [{"id": "12D3KooWAbcdefghijklmnop", "name": null}],
        });
        assert_eq!(
            super::describe("stock/a", &unnamed),
            "stock/a changed by 12D3KooWAbcdefgh…"
        );
    }
}
