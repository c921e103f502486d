//! `mesh put`: set fields of a record.

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};

use super::output::print_written;
use super::{Context, record_path};
use crate::client::ClientError;
use crate::replies::WrittenReply;

#[derive(clap::Args)]
pub struct Args {
    /// The collection.
    collection: String,
    /// The record id.
    id: String,
    /// Fields to set as FIELD=VALUE (`FIELD=null` removes one), or counters to add to as
    /// FIELD+=N or FIELD-=N. A counter is created with --json '{"FIELD": {"$counter": N}}'.
    fields: Vec<String>,
    /// Fields as a JSON object, merged with FIELD=VALUE pairs; `@FILE` reads the object
    /// from a file, `-` from standard input (for values too long for a command line).
    #[arg(long = "json", value_name = "OBJECT")]
    json_fields: Option<String>,
}

/// The text of `--json`: as given, from a file (`@FILE`) or from standard input (`-`).
fn json_argument(given: &str) -> anyhow::Result<String> {
    if given == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the fields from standard input")?;
        return Ok(text);
    }
    if let Some(path) = given.strip_prefix('@') {
        return std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the fields from {path}"));
    }
    Ok(given.to_owned())
}

pub fn run(context: &Context, args: Args) -> Result<(), ClientError> {
    let mut object = match args.json_fields {
        Some(given) => {
            let text = json_argument(&given)?;
            match serde_json::from_str::<Value>(&text).context("--json is not valid JSON")? {
                Value::Object(object) => object,
                _ => return Err(anyhow!("--json must be a JSON object of fields").into()),
            }
        }
        None => serde_json::Map::new(),
    };
    for pair in &args.fields {
        let (name, value) = parse_pair(pair)?;
        if object.contains_key(&name) {
            return Err(anyhow!("field `{name}` is given twice").into());
        }
        object.insert(name, value);
    }
    if object.is_empty() {
        return Err(anyhow!("give fields as FIELD=VALUE or --json '{{...}}'").into());
    }
    let path = record_path(&args.collection, &args.id)?;
    let written: WrittenReply = context
        .client()?
        .send_as("PUT", &path, &Value::Object(object))?;
    print_written(&written, "written");
    Ok(())
}

/// Reads FIELD=VALUE, or FIELD+=N / FIELD-=N (an increment of a counter, sent as
/// `{"$inc": N}`). Only the first `=` counts, so a value may hold `+=`.
fn parse_pair(pair: &str) -> anyhow::Result<(String, Value)> {
    let (name, value) = pair
        .split_once('=')
        .ok_or_else(|| anyhow!("`{pair}` is not FIELD=VALUE, FIELD+=N or FIELD-=N"))?;
    let increment = [('+', 1), ('-', -1)]
        .into_iter()
        .find_map(|(sign, factor)| Some((name.strip_suffix(sign)?, factor)));
    let Some((counter, factor)) = increment.filter(|(counter, _)| !counter.is_empty()) else {
        return Ok((name.to_owned(), parse_value(value)?));
    };
    let amount: i64 = value.parse().map_err(|_| {
        anyhow!("`{pair}`: add a whole number to a counter, like {counter}+=5 or {counter}-=3")
    })?;
    let amount = amount
        .checked_mul(factor)
        .ok_or_else(|| anyhow!("`{pair}`: the amount is out of range"))?;
    Ok((counter.to_owned(), json!({ "$inc": amount })))
}

/// Reads a FIELD=VALUE value. Only what reads back the same becomes a number: `007` stays
/// text (codes keep their zeros), as do `1e5`, `nan` and `inf` (only plain digits with an
/// optional point are numbers); an integer too large for 64 bits is refused rather than
/// rounded, and a number with a point that a float cannot hold exactly is sent as the
/// decimal it is (`{"$decimal": "..."}`).
fn parse_value(text: &str) -> anyhow::Result<Value> {
    if text.starts_with('+') {
        // `+41 79 …` is a phone number, not a number.
        return Ok(json!(text));
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = match digits.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (digits, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let plain_number = all_digits(whole) && fraction.is_none_or(all_digits);
    let leading_zero = whole.len() > 1 && whole.starts_with('0');
    Ok(if text == "null" {
        Value::Null
    } else if text == "true" || text == "false" {
        json!(text == "true")
    } else if !plain_number || leading_zero {
        json!(text)
    } else if fraction.is_none() {
        let number: i64 = text.parse().map_err(|_| {
            anyhow!(
                "`{text}` does not fit a 64-bit integer; to store it as text, use --json '{{\"field\": \"{text}\"}}'"
            )
        })?;
        json!(number)
    } else {
        let exact = crdt_schema::Decimal::parse(text).map_err(|error| anyhow!("{error}"))?;
        let float: f64 = text
            .parse()
            .expect("plain digits with a point read as a float");
        if crdt_schema::Decimal::from_float(float).as_ref() == Some(&exact) {
            json!(float)
        } else {
            json!({ "$decimal": exact.to_string() })
        }
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_typed_and_never_become_a_removal() {
        let read = |text: &str| parse_value(text).unwrap();
        assert_eq!(read("12"), json!(12));
        assert_eq!(read("-3"), json!(-3));
        assert_eq!(read("1.5"), json!(1.5));
        assert_eq!(read("0.25"), json!(0.25));
        assert_eq!(read("0"), json!(0));
        assert_eq!(read("true"), json!(true));
        assert_eq!(read("null"), Value::Null);
        assert_eq!(read("007"), json!("007"), "codes keep their zeros");
        assert_eq!(read("nan"), json!("nan"));
        assert_eq!(read("-inf"), json!("-inf"));
        assert_eq!(read("Infinity"), json!("Infinity"));
        assert_eq!(read("Aspirin 500"), json!("Aspirin 500"));
        assert_eq!(read(""), json!(""));
        assert_eq!(read("+41791234567"), json!("+41791234567"));
        assert_eq!(read("+5"), json!("+5"));
        let error = parse_value("99999999999999999999").unwrap_err().to_string();
        assert!(error.contains("does not fit a 64-bit integer"), "{error}");
        assert_eq!(read("1e5"), json!("1e5"), "only plain digits are numbers");
        assert_eq!(read("1e400"), json!("1e400"));
        assert_eq!(read("1."), json!("1."));
        assert_eq!(read("12.50"), json!(12.5));
        assert_eq!(
            read("0.30000000000000004"),
            json!({"$decimal": "0.30000000000000004"}),
            "17 digits a float would round are kept exactly"
        );
        assert_eq!(
            read("-1234567890.123456789"),
            json!({"$decimal": "-1234567890.123456789"})
        );
    }

    #[test]
    fn plus_equals_and_minus_equals_add_to_a_counter() {
        let pair = |text: &str| parse_pair(text).unwrap();
        assert_eq!(pair("count+=5"), ("count".into(), json!({"$inc": 5})));
        assert_eq!(pair("count-=3"), ("count".into(), json!({"$inc": -3})));
        assert_eq!(pair("count=7"), ("count".into(), json!(7)));
        assert_eq!(pair("note=a+=b"), ("note".into(), json!("a+=b")));
        assert_eq!(
            pair("+=5"),
            ("+".into(), json!(5)),
            "no name: a field called `+`"
        );
        let error = parse_pair("count+=lots").unwrap_err().to_string();
        assert!(error.contains("whole number"), "{error}");
        assert!(parse_pair("count").is_err());
    }
}
