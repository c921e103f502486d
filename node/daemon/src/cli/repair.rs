//! `mesh repair`: set damaged change-log entries aside and keep the rest.

use super::Context;
use crate::client::ClientError;
use crate::store;

pub fn run(context: &Context) -> Result<(), ClientError> {
    let report = store::repair(&context.dir()?)?;
    if report.set_aside.is_empty() && report.truncated_bytes == 0 {
        out!(
            "the change log is sound: {} entries, nothing to repair",
            report.entries
        );
        return Ok(());
    }
    for (offset, length) in &report.set_aside {
        out!("set aside {length} damaged bytes at byte {offset}");
    }
    if let Some(file) = &report.damaged_file {
        out!("the damaged bytes are kept in {}", file.display());
    }
    if report.truncated_bytes > 0 {
        out!(
            "cut a torn entry of {} bytes off the end (never acknowledged)",
            report.truncated_bytes
        );
    }
    out!(
        "the change log keeps {} entries; start the node again (`mesh node run`); peers can bring the damaged changes again",
        report.entries
    );
    Ok(())
}
