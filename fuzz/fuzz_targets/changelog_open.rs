//! Arbitrary bytes as the change log on disk: opening never panics; a torn tail is cut,
//! damage before valid entries refuses the start, and after a repair the log opens with
//! exactly the entries the repair kept.

#![no_main]

#[allow(dead_code)]
#[path = "../../node/daemon/src/changelog.rs"]
mod changelog;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_fuzz::init();
    let dir = std::env::temp_dir().join(format!("mesh-fuzz-log-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("changes.log");
    let mut bytes = b"MESHLOG1".to_vec();
    bytes.extend_from_slice(data);
    std::fs::write(&path, &bytes).expect("the temp dir is writable");
    match changelog::ChangeLog::open(&path) {
        Ok((log, report)) => {
            let entries = log.entries().to_vec();
            drop(log);
            // Only a tail can have been cut, and the cut is durable.
            assert!(report.truncated_bytes as usize <= data.len());
            let (again, report) = changelog::ChangeLog::open(&path).expect("opens again");
            assert_eq!(again.entries(), &entries[..]);
            assert_eq!(report.truncated_bytes, 0);
        }
        Err(error) => {
            assert!(error.to_string().contains("mesh repair"), "{error}");
            assert_eq!(
                std::fs::read(&path).expect("still there"),
                bytes,
                "left as it was"
            );
            let repaired = changelog::ChangeLog::repair(&path).expect("repairs");
            let (log, _) = changelog::ChangeLog::open(&path).expect("opens after a repair");
            assert_eq!(log.len(), repaired.entries);
            if let Some(aside) = repaired.damaged_file {
                let _ = std::fs::remove_file(aside);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
