// Shared by several test crates; each uses a different part.
#![allow(dead_code)]

//! Headless Chromium driven over WebDriver (Debian's chromium and chromium-driver).

use std::{process::Stdio, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};

/// A browser session; the driver (and with it the browser) ends when this drops.
pub struct Browser {
    pub client: Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a fresh headless Chromium profile.
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver not found: run scripts/setup.sh (installs chromium-driver)");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut last = None;
        for _ in 0..100 {
            let http = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(http)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        _driver: driver,
                        _profile: profile,
                    }
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not start a Chromium session: {last:?}");
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Waits (up to `secs`) for an element matching `css`.
    pub async fn wait_for(&self, css: &str, secs: u64) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(secs))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?} within {secs} s: {e}"))
    }

    /// Waits (up to `secs`) for an element matching `css` and returns its text.
    pub async fn wait_text(&self, css: &str, secs: u64) -> String {
        self.wait_for(css, secs).await.text().await.unwrap()
    }

    /// Whether an element matching `css` is on the page now.
    pub async fn has(&self, css: &str) -> bool {
        self.client.find(Locator::Css(css)).await.is_ok()
    }

    /// The text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Types `text` into the field matching `css`.
    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.clear().await.unwrap();
        el.send_keys(text).await.unwrap();
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?} to click: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Logs in with a local account on the UI at `base`.
    pub async fn login(&self, base: &str, name: &str, password: &str) {
        self.goto(&format!("{base}/login")).await;
        self.fill("#name", name).await;
        self.fill("#password", password).await;
        self.click("button[type=submit]").await;
        self.wait_for("header.top", 10).await;
    }

    /// Runs `fetch` from the page (same origin, with its cookies) and returns the status.
    pub async fn post_from_page(&self, path: &str, body: &str) -> u16 {
        let script = "const [path, body, done] = arguments; \
            fetch(path, {method: 'POST', credentials: 'same-origin', redirect: 'manual', \
              headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body}) \
            .then(r => done(r.status)).catch(e => done(-1));";
        let v = self
            .client
            .execute_async(script, vec![path.into(), body.into()])
            .await
            .unwrap();
        v.as_u64().unwrap_or(0) as u16
    }

    /// Ends the session (and the browser).
    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
