//! What every command prints with: lines made safe for the terminal, JSON or text, and the
//! small formatters tables share.

use crate::replies::{RecordReply, WrittenReply};

/// `text` with every control character but newline and tab, and the Unicode controls that
/// reorder text, replaced by U+FFFD: an escape sequence from a peer (in its name, a refusal
/// reason or a record) would otherwise act on the operator's terminal.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if text.chars().any(unsafe_char) {
        text.chars()
            .map(|c| if unsafe_char(c) { '\u{fffd}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Writes bytes to stdout as they are (a script, a manual page), ending the program quietly
/// when nobody reads any more, as `out!` does.
pub(crate) fn write_stdout(bytes: &[u8]) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("cannot write to stdout: {error}");
    }
}

/// Prints a table: a header and aligned columns without borders, each line through `out!`
/// (so peer-supplied text is made safe); the columns in `right` are right-aligned.
pub(crate) fn print_table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) {
    use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    // Two spaces between columns, none before the first.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for index in right {
        if let Some(column) = table.column_mut(*index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    for line in table.to_string().lines() {
        out!("  {}", line.trim_end());
    }
}

/// Prints a reply as pretty JSON (`--json`) or in words, by `human`.
pub(crate) fn print_or<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(value).expect("replies serialise")
        );
    } else {
        human(value);
    }
}

pub(crate) fn print_written(written: &WrittenReply, verb: &str) {
    match &written.change {
        Some(change) => out!(
            "{} {verb} (change {})",
            written.record,
            &change[..change.len().min(12)]
        ),
        None => out!("{} unchanged", written.record),
    }
}

pub(crate) fn print_record(record: &RecordReply) {
    let deleted = if record.deleted { "  (deleted)" } else { "" };
    out!("{}/{}{deleted}", record.collection, record.id);
    let width = record.fields.keys().map(String::len).max().unwrap_or(0);
    for (name, value) in &record.fields {
        let Some(others) = record.conflicts.get(name) else {
            out!("  {name:width$}  {}", shown_value(value));
            continue;
        };
        // A field concurrent writes left with several values: say so, and list the others.
        out!(
            "  {name:width$}  {}  (conflict: {} other)",
            shown_value(value),
            others.len()
        );
        for other in others {
            let author = other
                .author_name
                .clone()
                .unwrap_or_else(|| short(Some(&other.author), 12).to_owned());
            let when = u64::try_from(other.time_ms).ok();
            out!(
                "  {:width$}    also {} by {author}, written {}",
                "",
                shown_value(&other.value),
                ago(when)
            );
        }
    }
}

/// A field's value as the CLI prints it: text bare, a counter and a decimal as numbers.
fn shown_value(value: &serde_json::Value) -> String {
    let tagged = |tag| {
        value
            .get(tag)
            .filter(|_| value.as_object().map(serde_json::Map::len) == Some(1))
    };
    if let Some(text) = value.as_str() {
        text.to_owned()
    } else if let Some(count) = tagged("$counter") {
        format!("{count} (counter)")
    } else if let Some(decimal) = tagged("$decimal").and_then(serde_json::Value::as_str) {
        decimal.to_owned()
    } else {
        value.to_string()
    }
}

pub(crate) fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let now = mesh_now_ms();
    let seconds = now.saturating_sub(ms) / 1000;
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

pub(crate) fn mesh_now_ms() -> u64 {
    crate::clock::Clock::default().now().as_millis()
}

/// `count` and the noun, in the plural unless the count is one.
pub(crate) fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The first `len` characters of an id, for tables.
pub(crate) fn short(text: Option<&str>, len: usize) -> &str {
    let text = text.unwrap_or("?");
    text.get(..len).unwrap_or(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(super::printable("hq"), "hq");
        assert_eq!(super::printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(
            super::printable("\u{1b}[2J\u{1b}]0;owned\u{7}hq\u{202e}"),
            "\u{fffd}[2J\u{fffd}]0;owned\u{fffd}hq\u{fffd}"
        );
    }
}
