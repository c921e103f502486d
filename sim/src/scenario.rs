//! Scripted scenarios: behaviour told as a story, run on the simulator.
//!
//! One step per line; `#` starts a comment. Node numbers start at 0. Time only moves in
//! `run` steps; a calm network (5 ms latency, no faults) connects every pair at the start.
//!
//! ```text
//! nodes 3
//! write 0 stock/aspirin count=10 name="Aspirin 500"
//! run 1s
//! partition 0 | 1 2              # cut the network between the groups
//! write 0 stock/aspirin count=9
//! write 1 stock/aspirin name=Aspirin
//! run 2s
//! heal                           # end partitions, reconnect everyone
//! crash 2
//! restart 2
//! run 5s
//! expect converged
//! expect acked                   # every acknowledged write is on every node
//! expect 2 stock/aspirin count=9 name=Aspirin
//! expect 1 stock/old missing
//! ```
//!
//! Other steps: `delete N collection/id`, `disconnect A B`, `connect A B`,
//! `expect N collection/id deleted`. Values are integers, `true`/`false`, quoted strings,
//! or bare words as strings.

use std::collections::BTreeMap;

use crdt_schema::{FieldEdit, FieldValue, RecordId};
use mesh_core::{Command, Reply};

use crate::plan::{FaultPlan, Options};
use crate::rng::SimRng;
use crate::world::{NodeFactory, World};

/// Why a scenario failed: the line and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// 1-based line number.
    pub line: usize,
    /// The step as written.
    pub step: String,
    /// What went wrong.
    pub problem: String,
}

impl std::error::Error for ScenarioError {}

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: `{}`: {}", self.line, self.step, self.problem)
    }
}

/// Runs a scenario on the real node core.
pub fn run(text: &str) -> Result<(), ScenarioError> {
    run_with(text, &crate::world::real_node)
}

/// Runs a scenario with a node factory (tests pass broken variants).
pub fn run_with(text: &str, factory: &NodeFactory) -> Result<(), ScenarioError> {
    let mut world: Option<World<'_>> = None;
    for (index, raw) in text.lines().enumerate() {
        let step = raw.split('#').next().unwrap_or("").trim();
        if step.is_empty() {
            continue;
        }
        let error = |problem: String| ScenarioError {
            line: index + 1,
            step: step.to_owned(),
            problem,
        };
        let words = split_words(step).map_err(&error)?;
        let (verb, rest) = words.split_first().expect("non-empty step has a word");
        if verb == "nodes" {
            let count: usize = rest
                .first()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| error("give a node count".into()))?;
            let mut options = Options::new(0, count);
            options.duration = std::time::Duration::from_secs(3600);
            let mut built = World::with_plan(options, FaultPlan::calm(), SimRng::new(0), factory);
            built.connect_all();
            built.run_until(0);
            world = Some(built);
            continue;
        }
        let world = world
            .as_mut()
            .ok_or_else(|| error("the first step must be `nodes N`".into()))?;
        step_world(world, verb, rest).map_err(&error)?;
        if let Some(failure) = world.failure() {
            return Err(error(format!(
                "checker {} failed: {}",
                failure.checker, failure.message
            )));
        }
    }
    Ok(())
}

fn step_world(world: &mut World<'_>, verb: &str, rest: &[String]) -> Result<(), String> {
    let node = |index: usize| -> Result<usize, String> {
        let text = rest.get(index).ok_or("missing node number")?;
        let node: usize = text
            .parse()
            .map_err(|_| format!("`{text}` is not a node number"))?;
        if node >= world.len() {
            return Err(format!(
                "node {node} does not exist; there are {}",
                world.len()
            ));
        }
        Ok(node)
    };
    let record = |index: usize| -> Result<RecordId, String> {
        let text = rest.get(index).ok_or("missing record (collection/id)")?;
        text.parse()
            .map_err(|error: crdt_schema::record::NameError| error.to_string())
    };
    match verb {
        "run" => {
            let duration = rest.first().ok_or("give a duration like 500ms or 2s")?;
            let ms = parse_duration(duration)?;
            let until = world.now_ms() + ms;
            world.run_until(until);
        }
        "write" => {
            let (node, record) = (node(0)?, record(1)?);
            let fields = rest[2..]
                .iter()
                .map(|pair| parse_field(pair))
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            if fields.is_empty() {
                return Err("give at least one field=value".into());
            }
            world.command_later(node, Command::Put { record, fields });
        }
        "delete" => {
            let (node, record) = (node(0)?, record(1)?);
            world.command_later(node, Command::Delete { record });
        }
        "crash" => world.crash_now(node(0)?),
        "restart" => world.restart_now(node(0)?),
        "heal" => world.heal_network(),
        "partition" => {
            let bar = rest
                .iter()
                .position(|word| word == "|")
                .ok_or("separate the groups with |")?;
            let group = |words: &[String]| -> Result<Vec<usize>, String> {
                words
                    .iter()
                    .map(|word| {
                        word.parse()
                            .map_err(|_| format!("`{word}` is not a node number"))
                    })
                    .collect()
            };
            world.partition(&group(&rest[..bar])?, &group(&rest[bar + 1..])?);
        }
        "disconnect" => {
            let (a, b) = (node(0)?, node(1)?);
            world.partition(&[a], &[b]);
        }
        "connect" => world.heal_network(),
        "expect" => expect(world, rest)?,
        other => return Err(format!("unknown step `{other}`")),
    }
    Ok(())
}

fn expect(world: &mut World<'_>, rest: &[String]) -> Result<(), String> {
    match rest.first().map(String::as_str) {
        Some("converged") => {
            if world.all_equal() {
                Ok(())
            } else {
                let digests: Vec<String> = (0..world.len())
                    .map(|node| {
                        world
                            .digest(node)
                            .map_or("down".into(), |digest| digest.to_string())
                    })
                    .collect();
                Err(format!("digests differ: {}", digests.join(", ")))
            }
        }
        Some("acked") => {
            let missing = world.missing_acked();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing.join("; "))
            }
        }
        Some(_) => {
            let node: usize = rest[0]
                .parse()
                .map_err(|_| format!("`{}` is neither converged, acked nor a node", rest[0]))?;
            if node >= world.len() {
                return Err(format!("node {node} does not exist"));
            }
            let record: RecordId = rest
                .get(1)
                .ok_or("missing record")?
                .parse()
                .map_err(|error: crdt_schema::record::NameError| error.to_string())?;
            let view = match world.command_now(
                node,
                Command::Get {
                    record: record.clone(),
                },
            ) {
                Some(Ok(Reply::Record(view))) => view,
                None => return Err(format!("node {node} is down")),
                other => return Err(format!("get failed: {other:?}")),
            };
            match rest.get(2).map(String::as_str) {
                Some("missing") => match view {
                    None => Ok(()),
                    Some(view) => Err(format!("{record} exists on node {node}: {:?}", view.fields)),
                },
                Some("deleted") => match view {
                    Some(view) if view.deleted => Ok(()),
                    _ => Err(format!("{record} is not deleted on node {node}")),
                },
                _ => {
                    let view =
                        view.ok_or_else(|| format!("{record} does not exist on node {node}"))?;
                    for pair in &rest[2..] {
                        let (name, want) = parse_field(pair)?;
                        let want = match want {
                            FieldEdit::Set(value) => Some(value),
                            FieldEdit::Remove => None,
                            FieldEdit::Add(_) => {
                                return Err(format!("`{pair}`: expect a value, not an increment"));
                            }
                        };
                        let have = view.fields.get(&name);
                        if have != want.as_ref() {
                            return Err(format!(
                                "node {node} has {record} {name} = {have:?}, expected {want:?}"
                            ));
                        }
                    }
                    Ok(())
                }
            }
        }
        None => Err("expect what? converged, acked, or N collection/id ...".into()),
    }
}

/// `name=value` sets (`"text"`, an integer, `true`/`false`, `counter(N)` for a new
/// counter, `null` to remove); `name+=N` and `name-=N` add to a counter.
fn parse_field(pair: &str) -> Result<(String, FieldEdit), String> {
    let amount = |name: &str, text: &str, sign: i64| {
        text.parse::<i64>()
            .map(|amount| (name.to_owned(), FieldEdit::Add(sign * amount)))
            .map_err(|_| format!("`{pair}`: the amount must be an integer"))
    };
    if let Some((name, text)) = pair.split_once("+=") {
        return amount(name, text, 1);
    }
    if let Some((name, text)) = pair.split_once("-=") {
        return amount(name, text, -1);
    }
    let (name, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("`{pair}` is not field=value"))?;
    let value = if let Some(text) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        FieldValue::Str(text.to_owned())
    } else if let Ok(number) = value.parse::<i64>() {
        FieldValue::Int(number)
    } else if value == "true" || value == "false" {
        FieldValue::Bool(value == "true")
    } else if value == "null" {
        return Ok((name.to_owned(), FieldEdit::Remove));
    } else if let Some(count) = value
        .strip_prefix("counter(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        let count = count
            .parse()
            .map_err(|_| format!("`{pair}`: a counter starts at an integer"))?;
        FieldValue::Counter(count)
    } else {
        FieldValue::Str(value.to_owned())
    };
    Ok((name.to_owned(), FieldEdit::Set(value)))
}

fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60_000)
    } else {
        return Err(format!("`{text}` needs a unit: ms, s or m"));
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration"))?;
    Ok(number * scale)
}

/// Splits a step into words, keeping quoted strings (with `=` before them) whole.
fn split_words(step: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for character in step.chars() {
        match character {
            '"' => {
                quoted = !quoted;
                current.push(character);
            }
            ' ' | '\t' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(character),
        }
    }
    if quoted {
        return Err("unclosed quote".into());
    }
    if !current.is_empty() {
        words.push(current);
    }
    Ok(words)
}
