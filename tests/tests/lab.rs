//! The lab as a test: `sluice_tests::lab::run`, the code `cargo xtask lab` runs (network
//! namespaces standing for the bastion and database hosts of `vagrant/`, provisioned by the
//! same scripts, the bastion installing the agent's package, then the engineer's walk-through),
//! fails the test when anything it shows is
//! not so.

#[test]
fn an_engineer_on_the_bastion_is_intercepted_identified_denied_masked_and_recorded_on_the_collector()
 {
    if !sluice_tests::require_root("lab") {
        return;
    }
    // The bastion installs the agent's package (`cargo xtask test` builds it).
    let Some(debs) = sluice_tests::package::debs("lab") else {
        return;
    };
    let Some(deb) = sluice_tests::package::deb(&debs, "sluice_") else {
        return;
    };
    if let Err(e) = sluice_tests::lab::run(deb) {
        panic!("the lab failed: {e:#}");
    }
}
