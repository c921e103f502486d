//! Behaviour told as stories, run on the simulator (see `sim::scenario` for the format).

fn run(story: &str) {
    if let Err(error) = sim::scenario::run(story) {
        panic!("{error}");
    }
}

#[test]
fn laptops_that_edit_offline_merge_field_by_field_when_they_meet() {
    run(r#"
        nodes 3
        write 0 customers/acme phone="555-0100" city=Basel
        run 1s
        expect converged
        partition 0 | 1 2
        write 0 customers/acme phone="555-0199"
        write 1 customers/acme city=Zurich
        run 2s
        heal
        run 3s
        expect converged
        expect acked
        expect 2 customers/acme phone="555-0199" city=Zurich
        expect 0 customers/acme phone="555-0199" city=Zurich
    "#);
}

#[test]
fn a_crashed_node_keeps_its_acknowledged_writes_and_catches_up() {
    run(r#"
        nodes 3
        write 2 stock/aspirin count=10
        run 500ms
        partition 2 | 0 1
        write 2 stock/ibuprofen count=4     # acknowledged while cut off
        run 100ms
        crash 2
        write 0 stock/aspirin count=9       # written while node 2 is down
        run 1s
        restart 2
        heal
        run 5s
        expect converged
        expect acked
        expect 1 stock/ibuprofen count=4
        expect 2 stock/aspirin count=9
    "#);
}

#[test]
fn a_delete_reaches_every_node() {
    run(r#"
        nodes 4
        write 3 visits/v1 patient=p7 room=2
        run 1s
        delete 1 visits/v1
        run 1s
        expect converged
        expect 0 visits/v1 deleted
        expect 3 visits/v1 deleted
        expect 2 visits/never missing
    "#);
}

#[test]
fn a_scenario_that_expects_the_wrong_value_fails_and_names_the_line() {
    let error =
        sim::scenario::run("nodes 2\nwrite 0 stock/a count=1\nrun 1s\nexpect 1 stock/a count=2\n")
            .unwrap_err();
    assert_eq!(error.line, 4);
    assert!(error.problem.contains("expected Some(Int(2))"), "{error}");
    let error = sim::scenario::run("write 0 stock/a count=1").unwrap_err();
    assert!(
        error.problem.contains("first step must be `nodes N`"),
        "{error}"
    );
    let error = sim::scenario::run("nodes 2\nexplode 1").unwrap_err();
    assert!(error.problem.contains("unknown step"), "{error}");
}
