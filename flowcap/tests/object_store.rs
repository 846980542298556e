//! The history on an S3-compatible object store: `flowcap run --history
//! s3://…` writes (and compacts) it there, `flowcap sql --history s3://…`
//! and `flowcap query` read it, and every table holds what a local run of
//! the same workload holds. The store is a local Moto server (Python
//! `moto[server]` from PyPI) started by the test on a free port.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

/// A Moto S3 server on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, flask, flask_cors"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request (Moto checks no signatures); the body.
    fn request(&self, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
            "{method} {path}: {response}"
        );
        response
    }

    /// Every key under `prefix` (one listing page is enough here).
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let body = self.request(
            "GET",
            &format!("/{bucket}?list-type=2&max-keys=100000&prefix={prefix}"),
        );
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }
}

fn with_aws_env(cmd: &mut Command, moto: &Moto) {
    cmd.env("AWS_ENDPOINT", moto.endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
}

fn run(out: &Path, extra: &[&str], moto: &Moto) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run", "-q", "--json", "--cards", "1500", "--hours", "60", "--seed", "5",
    ])
    .args(["--snapshot-every", "10000", "--history-roll-rows", "3000"])
    .args(extra)
    .arg("--out")
    .arg(out);
    with_aws_env(&mut cmd, moto);
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// `flowcap ARGS` with the AWS environment; standard output.
fn flowcap(args: &[&str], moto: &Moto) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    with_aws_env(&mut cmd, moto);
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    String::from_utf8(res.stdout).unwrap()
}

#[test]
fn the_history_on_s3_equals_the_local_one_and_is_compacted() {
    if !moto_available() {
        if std::env::var_os("FLOWCAP_SKIP_S3").is_some() {
            eprintln!("skipped: python3 -m pip install 'moto[server]' to run it");
            return;
        }
        panic!("Moto is missing: python3 -m pip install 'moto[server]' (or FLOWCAP_SKIP_S3=1)");
    }
    let moto = Moto::start();
    moto.request("PUT", "/flowcap");
    let dir = tempfile::tempdir().unwrap();
    let remote = "s3://flowcap/usage/history";
    run(
        &dir.path().join("remote"),
        &["--history", remote, "--history-compact-files", "3"],
        &moto,
    );
    let local = dir.path().join("local");
    run(&local, &["--history-compact-files", "0"], &moto);

    // Nothing of it landed locally; on S3 the files were merged, and no
    // temporary object exists.
    assert!(!dir.path().join("remote").join("history").exists());
    let keys = moto.keys("flowcap", "usage/history/");
    assert!(
        keys.iter()
            .any(|k| k.starts_with("usage/history/usage_records/date=")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.contains("-m0")),
        "nothing compacted: {keys:?}"
    );
    assert!(keys.iter().all(|k| k.ends_with(".parquet")), "{keys:?}");

    for query in [
        "SELECT COUNT(*) AS n, COUNT(DISTINCT record_id) AS ids, SUM(bytes) AS bytes, \
         MIN(date) AS first, MAX(date) AS last FROM usage_records",
        "SELECT iccid, day, records, bytes, late_bytes FROM card_daily_usage ORDER BY iccid, day",
        "SELECT iccid, cycle, records, bytes FROM card_cycle_usage ORDER BY iccid, cycle",
        "SELECT input_seq, reason, date FROM quarantine ORDER BY input_seq",
        "SELECT event_id, iccid, new_state, reasons FROM state_changes ORDER BY event_id",
        "SELECT input_seq, command_id, ok FROM command_journal ORDER BY input_seq",
        "SELECT COUNT(*) AS cards FROM cards_current",
        "SELECT cycle, pool_id, used_bytes, final FROM pool_cycle_usage \
         ORDER BY pool_id, cycle, final, used_bytes",
    ] {
        let want = common::sql_text(&local, "csv", query);
        let got = flowcap(
            &["sql", "--format", "csv", "--history", remote, query],
            &moto,
        );
        assert!(want.lines().count() > 1, "{query}: empty");
        assert!(want == got, "{query}: S3 differs from local");
    }
    let top = flowcap(
        &["query", "top-cards", "--format", "csv", "--history", remote],
        &moto,
    );
    let want = flowcap(
        &[
            "query",
            "top-cards",
            "--format",
            "csv",
            "--data",
            local.to_str().unwrap(),
        ],
        &moto,
    );
    assert_eq!(top, want);
    assert_eq!(top.lines().count(), 11, "{top}");
}
