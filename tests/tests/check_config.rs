//! `sluice check-config`, the real binary: the documented examples (`policies/sluice.toml` with
//! `policies/masking.toml`) check clean and say how each target is masked; a masking file whose
//! target globs match none of the configured targets is warned about. Needs no root.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use sluice_tests::sluice_bin;

fn policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// `sluice check-config` on `config` (written to a temp dir): (success, stdout, stderr).
fn check_config(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(sluice_bin())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The example config with its `masking_file` line pointing at `masking`.
fn example_with_masking(masking: &std::path::Path) -> String {
    let text = std::fs::read_to_string(policies().join("sluice.toml")).unwrap();
    let line = "# masking_file = \"/etc/sluice/masking.toml\"";
    assert!(
        text.contains(line),
        "the example config names no masking_file"
    );
    text.replace(line, &format!("masking_file = \"{}\"", masking.display()))
}

#[test]
fn the_example_config_and_masking_file_check_clean_and_show_each_targets_masking() {
    let (ok, stdout, stderr) =
        check_config(&example_with_masking(&policies().join("masking.toml")));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("warning"),
        "the examples must be consistent with each other:\n{stderr}"
    );
    assert!(stdout.contains("masking.toml: ok"), "{stdout}");
    let masking_of = |target: &str| -> String {
        let mut lines = stdout.lines();
        lines
            .find(|l| l.trim_start().starts_with(&format!("target {target} ")))
            .unwrap_or_else(|| panic!("no target {target}:\n{stdout}"));
        lines.next().unwrap().trim().to_string()
    };
    let prod = masking_of("prod-db");
    assert!(
        prod.starts_with("masking: strict ([[target]] \"prod-*\")"),
        "{prod}"
    );
    assert!(
        prod.contains("column rules: customer-email, card-numbers, ssn, customer-id-join-key"),
        "{prod}"
    );
    assert!(
        prod.contains("phone"),
        "the prod-only detector applies to prod-db: {prod}"
    );
    let app = masking_of("app-db");
    assert!(
        app.starts_with("masking: not strict ([[target]] \"*\")"),
        "{app}"
    );
    assert!(
        app.contains("detectors: email, card, iban, us_ssn, ipv4"),
        "{app}"
    );
    assert!(!app.contains("phone"), "{app}");
}

#[test]
fn masking_globs_that_match_no_configured_target_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("masking.toml");
    std::fs::write(
        &rules,
        "[[target]]\nname = \"production-*\"\nstrict = true\n\
         [[column]]\nname = \"mail\"\ntarget = \"app-db\"\ncolumn = \"email\"\nstrategy = \"redact\"\n\
         [[detector]]\nname = \"card\"\ntarget = \"billing\"\nstrategy = \"redact\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check_config(&example_with_masking(&rules));
    assert!(ok, "a warning is not an error: {stdout}\n{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("[[target]] name = \"production-*\" (strict = true) matches none of the configured targets (app-db, prod-db)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("detector \"card\": target = \"billing\""),
        "{stderr}"
    );
    assert!(!stderr.contains("\"mail\""), "app-db exists: {stderr}");
    assert!(
        stdout.contains(
            "masking: not strict (no [[target]] matches); column rules: none; detectors: none"
        ),
        "{stdout}"
    );
}

#[test]
fn without_a_masking_file_check_config_says_results_pass_unmasked() {
    let text = std::fs::read_to_string(policies().join("sluice.toml")).unwrap();
    let (ok, stdout, stderr) = check_config(&text);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("masking: none (no masking_file)"),
        "{stdout}"
    );
}

#[test]
fn a_masking_file_that_does_not_load_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("masking.toml");
    std::fs::write(
        &rules,
        "[[detector]]\nname = \"emial\"\nstrategy = \"redact\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check_config(&example_with_masking(&rules));
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("emial"), "{stderr}");
}
