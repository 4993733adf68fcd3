//! The service binary's command line (`agentbridge_runtime::service::main`, shared by all four
//! services): help, version, refused arguments, configuration errors before any connection, and
//! a clean stop on SIGTERM.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentbridge-normalizer");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("AGENTBRIDGE_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run agentbridge-normalizer")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("usage: agentbridge-normalizer [--config FILE]"), "{}", text(&out.stdout));
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), format!("agentbridge-normalizer {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn an_unusable_command_line_exits_2_with_the_usage() {
    for args in [&["serve"][..], &["--config"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("usage: agentbridge-normalizer"), "{args:?}: {err}");
    }
}

#[test]
fn configuration_errors_exit_1_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("agentbridge-binary-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let missing = dir.join("missing.yaml");
    let out = run(&["--config", missing.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("invalid configuration") && err.contains("missing.yaml"), "{err}");

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "transport:\n  kind: memory\n  no_such_key: 1\n").expect("write config");
    let out = run(&[&format!("--config={}", bad.display())]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no_such_key"), "the unknown key is named: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default configuration is the embedded one (in-memory bus and store): the binary starts
/// without any server, warns that nothing outside the process can reach it, and SIGTERM stops
/// it with exit 0.
#[cfg(unix)]
#[test]
fn runs_on_the_embedded_default_and_stops_cleanly_on_sigterm() {
    let mut child = Command::new(BIN)
        .env_remove("AGENTBRIDGE_CONFIG")
        .env("AGENTBRIDGE__NORMALIZER__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agentbridge-normalizer");
    // Give it time to start (and to fail, which the exit status below would show).
    std::thread::sleep(Duration::from_millis(700));
    assert!(child.try_wait().expect("poll child").is_none(), "the normalizer exited on its own");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 15 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut logs = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut logs).expect("read logs");
    child.stderr.take().expect("stderr").read_to_string(&mut logs).expect("read logs");
    assert!(status.success(), "exit status {status}: {logs}");
    assert!(logs.contains("shutdown signal received"), "{logs}");
    // A service on its own on the in-process bus and store is told so at start-up.
    assert!(logs.contains("WARN") && logs.contains("transport.kind and store.kind are `memory`"), "{logs}");
    // So is a normalizer without sources, which would refuse every push.
    assert!(logs.contains("no sources configured"), "{logs}");
}
