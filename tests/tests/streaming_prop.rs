//! Property: whatever the size of the difference between two nodes — none, or several times
//! everything one reconciliation answer may hold — they converge, and no answer either of
//! them sends holds more than its budget. The budgets are small here (the wire's limits are
//! tens of thousands, see catch_up.rs for a difference past them), so that a few hundred
//! records cross every bound many times over.

use std::time::Duration;

use crdt_schema::FieldValue;
use mesh_core::limits::RoundBudget;
use mesh_core::wire::{Message, RangeSummary};
use mesh_core::{Config, Effect};
use mesh_tests::Harness;
use proptest::prelude::*;

/// A budget within the range the node answers with as given (`RoundBudget::effective`
/// raises ranges to 17, items to 32 and needs to 1).
fn budget() -> impl Strategy<Value = RoundBudget> {
    (17..48usize, 32..96usize, 1..24usize, 1..6000usize).prop_map(
        |(ranges, items, needs, change_bytes)| RoundBudget {
            ranges,
            items,
            needs,
            change_bytes,
        },
    )
}

/// The most ranges, items and needs in any round node `index` sent.
fn largest_round(mesh: &Harness, index: usize) -> (usize, usize, usize) {
    let mut largest = (0, 0, 0);
    for effect in &mesh.nodes[index].effects {
        let Effect::Send { bytes, .. } = effect else {
            continue;
        };
        let (Message::SyncRequest(round) | Message::SyncResponse(round)) =
            Message::decode(bytes).expect("an honest node sends valid messages")
        else {
            continue;
        };
        let items = round
            .ranges
            .iter()
            .map(|range| match &range.summary {
                RangeSummary::Items(items) => items.len(),
                RangeSummary::Fingerprint { .. } => 0,
            })
            .sum();
        largest.0 = largest.0.max(round.ranges.len());
        largest.1 = largest.1.max(items);
        largest.2 = largest.2.max(round.needs.len());
    }
    largest
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn two_nodes_converge_whatever_the_size_of_their_difference(
        budgets in (budget(), budget()),
        shared in 0..200usize,
        only_first in 0..300usize,
        only_second in 0..300usize,
        both_edited in 0..300usize,
    ) {
        let budgets = [budgets.0, budgets.1];
        let mut mesh = Harness::with_config(2, |index| Config {
            round_budget: budgets[index],
            ..Config::default()
        });
        let key = |record: usize| format!("stock/r{record:04}");
        // Records both hold alike, then some both edit apart.
        for record in 0..shared + both_edited {
            mesh.put(0, &key(record), &[("count", FieldValue::Int(0))]);
        }
        mesh.connect(0, 1);
        mesh.run_until_quiet(100_000);
        let settle = |mesh: &mut Harness| {
            for _ in 0..60 {
                if mesh.converged() {
                    return;
                }
                mesh.advance(Duration::from_secs(40));
                mesh.run_until_quiet(100_000);
            }
        };
        settle(&mut mesh);
        prop_assert!(mesh.converged(), "the shared records did not converge");
        mesh.disconnect(0, 1);

        for record in shared..shared + both_edited {
            mesh.put(0, &key(record), &[("count", FieldValue::Int(1))]);
            mesh.put(1, &key(record), &[("note", FieldValue::Str("b".into()))]);
        }
        let first = 1000;
        for record in first..first + only_first {
            mesh.put(0, &key(record), &[("count", FieldValue::Int(2))]);
        }
        let second = 2000;
        for record in second..second + only_second {
            mesh.put(1, &key(record), &[("count", FieldValue::Int(3))]);
        }
        mesh.connect(0, 1);
        mesh.run_until_quiet(100_000);
        settle(&mut mesh);

        prop_assert!(mesh.converged(), "the nodes did not converge");
        for (index, budget) in budgets.iter().enumerate() {
            let status = mesh.status(index);
            prop_assert_eq!(status.counters.messages_rejected, 0);
            let (ranges, items, needs) = largest_round(&mesh, index);
            prop_assert!(ranges <= budget.ranges, "node {} sent {} ranges, budget {}", index, ranges, budget.ranges);
            prop_assert!(items <= budget.items, "node {} listed {} items, budget {}", index, items, budget.items);
            prop_assert!(needs <= budget.needs, "node {} sent {} needs, budget {}", index, needs, budget.needs);
            let records = status.records.get("stock").copied().unwrap_or(0);
            prop_assert_eq!(records, (shared + both_edited + only_first + only_second) as u64);
        }
    }
}
