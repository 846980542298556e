//! The web console (`/ui`) in headless Chromium against the real binary:
//! `flowcap run` over the load generator's cards with `--http` and
//! `--linger`, then `node --test console/e2e/` (playwright-core driving
//! Debian's `/usr/bin/chromium`), which checks the pages against the API's
//! answers and saves a screenshot of each page into `docs/console/`.
//!
//! It needs Node and the console's npm packages (`npm ci` in `console/`,
//! as `.ci/run` does) and Chromium; without them it fails and says so.
//! After the browser is done the run is stopped and its events must hold
//! the suspend the browser sent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{json_lines, linger, BIN};

const TOKEN: &str = "console-e2e-token-4b7d";
/// The browser and the test share one token: room for every request.
const CONFIG: &str = "[api]\nrate_per_sec = 1000.0\nburst = 1000\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_console_in_a_browser_shows_the_api_answers() {
    let console = repo().join("console");
    assert!(
        console.join("node_modules/playwright-core").is_dir(),
        "the console's npm packages are missing: run `npm ci` in console/ (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install -y chromium` (.ci/run does)"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = dir.path().join("flowcap.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let run = linger(
        Command::new(BIN)
            .args(["run", "-q", "--json", "--no-notify", "--shards", "2"])
            .args(["--hours", "2", "--cards", "2000", "--out"])
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .env("FLOWCAP_API_TOKENS", format!("console:admin:{TOKEN}")),
    );
    let url = format!("http://{}", run.addr);

    let shots = repo().join("docs/console");
    let browser = Command::new("node")
        .args(["--test", "--test-concurrency=1", "e2e/"])
        .current_dir(&console)
        .env("FLOWCAP_URL", &url)
        .env("FLOWCAP_TOKEN", TOKEN)
        .env("FLOWCAP_SHOTS", &shots)
        .env("FLOWCAP_E2E_OUT", dir.path())
        // `flowcap rules replay` on the same data, for the what-if form.
        .env("FLOWCAP_BIN", BIN)
        .env("FLOWCAP_DATA", &out)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node (Node.js 20) runs the browser tests");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&browser.stdout),
        String::from_utf8_lossy(&browser.stderr)
    );
    eprintln!("{report}");
    assert!(
        browser.status.success(),
        "the browser tests failed:\n{report}"
    );
    for line in ["# fail 0", "# skipped 0", "# cancelled 0"] {
        assert!(report.contains(line), "no `{line}`:\n{report}");
    }

    // Stop the run; the suspend sent from the card's page is an event.
    run.child.stop();
    let suspended = std::fs::read_to_string(dir.path().join("suspended.txt")).unwrap();
    let events = json_lines(&std::fs::read_to_string(out.join("events.jsonl")).unwrap());
    assert!(
        events.iter().any(|e| e["kind"] == "card_state"
            && e["iccid"] == suspended.as_str()
            && e["new"] == "suspended"
            && e["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == "manual"))),
        "no manual suspend event for {suspended}"
    );
}
