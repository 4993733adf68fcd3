//! `agentbridge dev` (what `make run` shows): every service in one process on the embedded
//! default must take each sample event to its documented outcome.

use std::process::Command;

#[test]
fn dev_runs_every_sample_to_its_outcome() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentbridge"))
        .arg("dev")
        .env_remove("AGENTBRIDGE_CONFIG")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run agentbridge dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all 6 samples reached an outcome"), "{stdout}");
    // The two bad samples are dead-lettered with their documented reasons ...
    assert!(stdout.contains("dead letter dlq.normalize: json_malformed"), "{stdout}");
    assert!(stdout.contains("dead letter dlq.normalize: schema_invalid"), "{stdout}");
    // ... and the four good ones run, pass the gate and are written back.
    assert_eq!(stdout.matches("  triggered run ").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("  written_back run ").count(), 4, "{stdout}");
    assert!(stdout.contains("→ results.accounts_payable"), "{stdout}");
    assert!(stdout.contains("PATCH /api/now/table/incident/"), "{stdout}");
    assert!(stdout.contains("PUT /api/v2/tickets/5158"), "{stdout}");
    assert!(stdout.contains("POST /api/invoices/1/comments"), "{stdout}");
    assert!(stdout.contains("agent simulator: 4 trigger requests, 4 runs"), "{stdout}");
    let total = stdout.lines().find(|l| l.starts_with("TOTAL")).expect("chargeback total line");
    assert!(!total.contains(" 0.000000"), "credits were recorded: {total}");
}
