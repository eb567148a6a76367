//! `/dashboard` in a real browser (headless Chromium, Debian's `chromium`): behind the API key, loads with no
//! script error, draws one heatmap cell per (MoE layer, expert), and its cells follow the traffic. A screenshot is
//! left in the test target directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use moe_e2e::{fixture, ExpertNodeProcess, RouterProcess};
use serde_json::json;

const KEY: &str = "dash-key";

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("MOE_CHROMIUM") {
        return p.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh").args(["-c", &format!("command -v {name}")]).output() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !path.is_empty() {
                return path.into();
            }
        }
    }
    panic!("no Chromium: install Debian's chromium (.ci/run does) or point $MOE_CHROMIUM at one");
}

/// What the browser made of the page: the DOM after its script ran, and the browser's log.
struct Loaded {
    dom: String,
    log: String,
}

/// Loads `url` in headless Chromium for a few seconds of the page's time; with `screenshot`, saves one there instead
/// of dumping the DOM.
fn load(url: &str, screenshot: Option<&Path>) -> Loaded {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(chromium());
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=4000")
        .arg("--window-size=1280,1400");
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    Loaded { dom: String::from_utf8_lossy(&out.stdout).into_owned(), log: String::from_utf8_lossy(&out.stderr).into() }
}

/// The heatmap's cells: (layer, expert, value).
fn cells(dom: &str) -> Vec<(u32, u32, u64)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[start..].split('"').next()?.to_owned())
    };
    dom.split("<td")
        .skip(1)
        .filter_map(|rest| rest.split('>').next())
        .filter(|tag| tag.contains("class=\"cell\""))
        .map(|tag| {
            let num = |name| attr(tag, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {tag}"));
            (num("data-layer") as u32, num("data-expert") as u32, num("data-value"))
        })
        .collect()
}

fn check_clean(page: &Loaded) {
    let errors = page.dom.split("id=\"errors\">").nth(1).and_then(|r| r.split("</div>").next()).unwrap_or("missing");
    assert_eq!(errors, "", "the page reported script errors");
    // Chromium logs every console message and uncaught exception of the page as `INFO:CONSOLE:LINE] "message"`.
    let console: Vec<&str> = page.log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console output: {console:#?}");
    let updates: u32 = page
        .dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("data-updates");
    assert!(updates >= 1, "the page never drew its data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_loads_cleanly_and_its_heatmap_follows_traffic() {
    let dir = fixture("qwen35");
    let nodes = [
        ExpertNodeProcess::start(&dir, "0-3", &[]).expect("node"),
        ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node"),
    ];
    let at = format!("{},{}", nodes[0].addr(), nodes[1].addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at, "--api-key", KEY]).expect("router");
    let url = router.url().to_owned();

    // Behind the key: refused without it, served with it as a header or in the query.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    for path in ["/dashboard", "/dashboard/data", "/dashboard?key=wrong"] {
        let status = client.get(format!("{url}{path}")).send().await.expect("sent").status().as_u16();
        assert_eq!(status, 401, "{path}");
    }
    let page = client.get(format!("{url}/dashboard?key={KEY}")).send().await.expect("sent");
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.expect("html");
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "the page loads nothing from elsewhere");

    let page_url = format!("{url}/dashboard?key={KEY}");
    let before = tokio::task::spawn_blocking({
        let u = page_url.clone();
        move || load(&u, None)
    })
    .await
    .expect("browser");
    check_clean(&before);
    let idle = cells(&before.dom);
    assert_eq!(idle.len(), 4 * 8, "one cell per (MoE layer, expert): 4 × 8");
    assert!(idle.iter().all(|&(_, _, v)| v == 0), "no traffic yet: {idle:?}");

    for i in 0..4u32 {
        let body = json!({"model": "qwen35", "prompt": (i..i + 9).collect::<Vec<_>>(), "max_tokens": 6,
                          "temperature": 0, "ignore_eos": true});
        let resp =
            client.post(format!("{url}/v1/completions")).bearer_auth(KEY).json(&body).send().await.expect("sent");
        assert_eq!(resp.status().as_u16(), 200);
    }

    let after = tokio::task::spawn_blocking({
        let u = page_url.clone();
        move || load(&u, None)
    })
    .await
    .expect("browser");
    check_clean(&after);
    let busy = cells(&after.dom);
    assert_eq!(busy.len(), 4 * 8);
    // Every token fed goes to its top 3 experts in every layer: each layer's row sums to 3 × tokens fed, 4 prompts
    // of 9 tokens and 5 generated tokens fed back each (the sixth ends the sequence unfed).
    for layer in 0..4 {
        let row: u64 = busy.iter().filter(|c| c.0 == layer).map(|c| c.2).sum();
        assert_eq!(row, 3 * 4 * (9 + 5), "layer {layer}: {busy:?}");
    }
    assert!(after.dom.contains("expert-"), "members are listed");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let s = shot.clone();
    tokio::task::spawn_blocking(move || load(&page_url, Some(&s))).await.expect("browser");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    eprintln!("dashboard screenshot: {}", shot.display());
}
