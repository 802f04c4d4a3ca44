//! The built-in web page (`/ui`) on the real server: its assets and headers (a strict
//! Content-Security-Policy, the API's Host rules), `/ui/state` as the page reads it, and the page
//! itself driven in a real headless Chromium (`tests/clients/ui_check.py`, with Selenium and
//! ChromeDriver installed by `scripts/fetch-browser.sh`, which the test command runs).

use pagedserve_tests::{plugin_component, repo_root, Server};
use serde_json::json;

const TOKEN: &str = "ui-admin-token";

fn header(response: &str, name: &str) -> Option<String> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
}

#[test]
fn the_page_is_served_with_a_strict_policy_and_its_state_reflects_the_engine() {
    let server = Server::start(&["--num-kv-blocks", "64", "--max-model-len", "512", "--admin-port", "0", "--admin-token", TOKEN]);
    let admin_port = server.admin_url("").rsplit(':').next().unwrap().to_string();
    let get = |path: &str, host: &str| server.raw(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes());

    let page = get("/ui", server.address());
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>pagedserve</title>"));
    let csp = header(&page, "content-security-policy").expect("a Content-Security-Policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    assert!(csp.contains(&format!("connect-src 'self' http://127.0.0.1:{admin_port}")), "the admin listener is reachable: {csp}");
    for (path, kind) in [("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let asset = get(path, server.address());
        assert!(asset.starts_with("HTTP/1.1 200"), "{path}");
        assert!(header(&asset, "content-type").unwrap().starts_with(kind), "{path}");
        assert_eq!(header(&asset, "x-content-type-options").as_deref(), Some("nosniff"));
    }
    // The API's Host rules hold for the page too (DNS rebinding).
    assert!(get("/ui", "evil.example:80").starts_with("HTTP/1.1 403"));

    let state = server.get("/ui/state").json();
    assert_eq!(state["engine"]["cells"].as_array().unwrap().len(), 64);
    assert_eq!((state["engine"]["num_blocks"].as_u64(), state["engine"]["blocks_per_cell"].as_u64()), (Some(64), Some(1)));
    assert!(state["engine"]["cells"].as_array().unwrap().iter().all(|b| b == 0), "nothing used yet: {state}");
    assert_eq!(state["engine"]["free"], 64);
    assert_eq!(state["admin"], json!(format!("http://127.0.0.1:{admin_port}")));
    assert_eq!(state["counters"]["generation_tokens"], 0);

    // After a request: tokens counted, its prompt's full block kept for prefix caching.
    let prompt = "The history of the lighthouse keepers of the northern coast begins with a storm that nobody forgot.";
    server.post_ok("/v1/completions", &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}));
    let state = server.get("/ui/state").json();
    assert_eq!(state["counters"]["generation_tokens"], 8);
    assert_eq!(state["counters"]["requests_finished"], 1);
    assert!(state["engine"]["cells"].as_array().unwrap().iter().any(|b| b == 2), "a cached prefix block: {state}");
    assert!(state["engine"]["cached"].as_u64().unwrap() >= 1);
    assert_eq!(state["time_to_first_token"]["count"], 1);
    assert_eq!(state["engine"]["running"], 0);

    // Without the admin API the page gets no admin origin (its plugins panel is read-only) and
    // may connect to nothing but its own origin.
    let plain = Server::start(&["--max-model-len", "512"]);
    assert!(plain.get("/ui/state").json()["admin"].is_null());
    let page = plain.raw(format!("GET /ui HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", plain.address()).as_bytes());
    assert!(header(&page, "content-security-policy").unwrap().contains("connect-src 'self';"), "{page}");
}

#[test]
fn the_page_works_in_a_real_browser() {
    let site = repo_root().join("target/pybrowser");
    assert!(site.join("selenium").exists(), "{} has no selenium: run scripts/fetch-browser.sh", site.display());
    assert!(std::path::Path::new("/usr/bin/chromedriver").exists(), "no ChromeDriver: run scripts/fetch-browser.sh");
    let server = Server::start(&["--admin-port", "0", "--admin-token", TOKEN, "--max-model-len", "512"]);
    let mut command = std::process::Command::new("python3");
    command
        .arg(repo_root().join("tests/clients/ui_check.py"))
        .arg(&server.base)
        .arg(server.admin_url(""))
        .arg(TOKEN)
        .arg(plugin_component("priority"))
        .env("PYTHONPATH", &site);
    if let Ok(dir) = std::env::var("PAGEDSERVE_UI_SCREENSHOTS") {
        command.arg(dir);
    }
    let output = command.output().expect("running python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser check failed:\n{stdout}\n{stderr}\n{}", server.log());
    assert!(stdout.contains("ui ok"), "{stdout}");
}
