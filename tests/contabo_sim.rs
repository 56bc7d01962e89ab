//! The Contabo simulator and the fake VPS, tested on their own with a raw HTTP client and a raw
//! russh client, so the backend's tests can trust them.
mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use russh::ChannelMsg;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{
    Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use serde_json::{Value, json};
use support::contabo_sim::{ContaboSim, Fault, SimConfig, UBUNTU_22_04, UBUNTU_24_04};
use support::fake_vps::{FakeVps, FakeVpsConfig};

// ---------------------------------------------------------------------------------------------
// helpers

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

fn form(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("form")
}

async fn token_request(sim: &ContaboSim, body: String) -> (StatusCode, Value) {
    let resp = http()
        .post(&sim.auth_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("token request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn password_grant(config: &SimConfig) -> String {
    form(&[
        ("grant_type", "password"),
        ("client_id", &config.client_id),
        ("client_secret", &config.client_secret),
        ("username", &config.username),
        ("password", &config.password),
    ])
}

/// Length of each timeline phase in the manual-time tests.
const PHASE_MS: u64 = 300;

/// A simulator with a client that holds a token.
struct Api {
    sim: ContaboSim,
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn start(config: SimConfig) -> Self {
        let grant = password_grant(&config);
        let sim = ContaboSim::start(config).await;
        let (status, body) = token_request(&sim, grant).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Self {
            token: body["access_token"].as_str().expect("token").to_string(),
            sim,
            http: http(),
        }
    }

    async fn default() -> Self {
        Self::start(SimConfig::default()).await
    }

    /// The test moves the simulator's clock: every status of a timeline is seen, however
    /// loaded the machine.
    async fn manual() -> Self {
        Self::start(SimConfig {
            provisioning_ms: PHASE_MS,
            installing_ms: PHASE_MS,
            manual_time: true,
            ..SimConfig::default()
        })
        .await
    }

    /// Let `ms` of simulated time pass, then the instance must be in `status`.
    async fn after(&self, ms: u64, id: i64, status: &str) -> Value {
        self.sim.advance(Duration::from_millis(ms));
        let instance = self.instance(id).await;
        assert_eq!(instance["status"], status, "{instance}");
        instance
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.sim.api_url))
            .bearer_auth(&self.token)
            .header("x-request-id", rid())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(Method::GET, path)).await
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.request(method, path).json(&body)).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, body).await
    }

    async fn create(&self, body: Value) -> i64 {
        let (status, body) = self.post("/v1/compute/instances", body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["data"][0]["instanceId"].as_i64().expect("instanceId")
    }

    async fn instance(&self, id: i64) -> Value {
        let (status, body) = self.get(&format!("/v1/compute/instances/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["data"][0].clone()
    }

    /// Poll (5 ms apart, 3 s at most) until the instance has this status.
    async fn wait_status(&self, id: i64, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let instance = self.instance(id).await;
            if instance["status"] == status {
                return instance;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {id} never reached {status}: {instance}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn secret(&self, name: &str, kind: &str, value: &str) -> i64 {
        let (status, body) = self
            .post(
                "/v1/secrets",
                json!({ "name": name, "type": kind, "value": value }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["data"][0]["secretId"].as_i64().expect("secretId")
    }
}

fn jwt_payload(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("json")
}

// ---------------------------------------------------------------------------------------------
// token endpoint

#[tokio::test]
async fn password_grant_returns_a_keycloak_token() {
    let config = SimConfig::default();
    let sim = ContaboSim::start(config.clone()).await;
    let (status, body) = token_request(&sim, password_grant(&config)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["refresh_expires_in"], 1800);
    for field in ["refresh_token", "session_state", "scope"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    assert!(body["not-before-policy"].is_number());
    let claims = jwt_payload(body["access_token"].as_str().expect("token"));
    assert!(claims["tenantId"].is_string() && claims["customerId"].is_string());
    assert!(claims["sub"].is_string());

    // The refresh grant gives a new, working token.
    let refresh = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", &config.client_id),
        ("client_secret", &config.client_secret),
        (
            "refresh_token",
            body["refresh_token"].as_str().expect("refresh"),
        ),
    ]);
    let (status, refreshed) = token_request(&sim, refresh).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let (status, _) = http()
        .get(format!("{}/v1/compute/instances", sim.api_url))
        .bearer_auth(refreshed["access_token"].as_str().expect("token"))
        .header("x-request-id", rid())
        .send()
        .await
        .map(|r| (r.status(), ()))
        .expect("list");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.token_requests(), 2);
}

#[tokio::test]
async fn token_errors_are_keycloak_shaped() {
    let config = SimConfig::default();
    let sim = ContaboSim::start(config.clone()).await;
    let grant = |password: &str, secret: &str| {
        form(&[
            ("grant_type", "password"),
            ("client_id", &config.client_id),
            ("client_secret", secret),
            ("username", &config.username),
            ("password", password),
        ])
    };
    let (status, body) = token_request(&sim, grant("wrong", &config.client_secret)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({"error":"invalid_grant","error_description":"Invalid user credentials"})
    );
    let (status, body) = token_request(&sim, grant(&config.password, "wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");

    let missing = form(&[("grant_type", "password"), ("client_id", &config.client_id)]);
    let (status, body) = token_request(&sim, missing).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");

    let refresh = form(&[
        ("grant_type", "refresh_token"),
        ("client_id", &config.client_id),
        ("client_secret", &config.client_secret),
        ("refresh_token", "not-a-token"),
    ]);
    let (status, body) = token_request(&sim, refresh).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");

    // A JSON body is not a form: Keycloak sees no grant_type.
    let resp = http()
        .post(&sim.auth_url)
        .json(&json!({"grant_type": "password"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(sim.token_requests(), 5);
}

// ---------------------------------------------------------------------------------------------
// /v1 gate

#[tokio::test]
async fn v1_needs_a_bearer_token_and_a_uuid_request_id() {
    let api = Api::default().await;
    let url = format!("{}/v1/compute/instances", api.sim.api_url);

    let resp = api
        .http
        .get(&url)
        .header("x-request-id", rid())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"statusCode":401,"message":"Unauthorized"})
    );
    let resp = api
        .http
        .get(&url)
        .bearer_auth("forged.token.value")
        .header("x-request-id", rid())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    for bad in [
        None,
        Some("not-a-uuid"),
        Some("0e8c1d3a-9f7b-6c2e-8a1b-2c3d4e5f6a7b"),
    ] {
        let mut req = api.http.get(&url).bearer_auth(&api.token);
        if let Some(bad) = bad {
            req = req.header("x-request-id", bad);
        }
        let resp = req.send().await.expect("sent");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"statusCode":400,"message":["x-request-id must be a UUID"]})
        );
    }
    // Upper case is fine (the docs' own example).
    let resp = api
        .http
        .get(&url)
        .bearer_auth(&api.token)
        .header("x-request-id", "51A87ECD-754E-4104-9C54-D01AD0F83406")
        .header("x-trace-id", "job-1")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);

    let requests = api.sim.requests();
    let last = requests.last().expect("recorded");
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.status),
        ("GET", "/v1/compute/instances", 200)
    );
    assert_eq!(
        last.request_id.as_deref(),
        Some("51A87ECD-754E-4104-9C54-D01AD0F83406")
    );
    assert_eq!(last.trace_id.as_deref(), Some("job-1"));
    let (status, body) = api.get("/v1/nothing/here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["message"], "Cannot GET /v1/nothing/here");
}

// ---------------------------------------------------------------------------------------------
// instances

#[tokio::test]
async fn create_goes_provisioning_installing_running() {
    let api = Api::manual().await;
    let (status, body) = api
        .post(
            "/v1/compute/instances",
            json!({ "productId": "V95", "region": "EU", "period": 1, "displayName": "op-1", "defaultUser": "root" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created = &body["data"][0];
    let id = created["instanceId"].as_i64().expect("id");
    assert!((100_000_000..1_000_000_000).contains(&id), "9 digits: {id}");
    assert_eq!(created["status"], "provisioning");
    assert_eq!(created["productId"], "V95");
    assert_eq!(created["imageId"], UBUNTU_22_04);
    assert!(created.get("ipConfig").is_none(), "no IP on create");
    assert_eq!(
        body["_links"]["self"],
        format!("/v1/compute/instances/{id}")
    );

    let first = api.instance(id).await;
    assert_eq!(first["status"], "provisioning");
    assert_eq!(first["ipConfig"]["v4"]["ip"], "");
    assert_eq!(first["cancelDate"], Value::Null);
    assert_eq!(first["name"], format!("vmi{:07}", id % 10_000_000));
    assert_eq!(first["cpuCores"], 6);
    assert_eq!(first["ramMb"], 12288);
    assert_eq!(first["diskMb"], 204800);
    assert_eq!(first["productName"], "Cloud VPS 20 SSD (no setup)");
    assert_eq!(first["dataCenter"], "European Union 2");

    // Just before the phase ends it is still provisioning, without an address.
    let still = api.after(PHASE_MS - 1, id, "provisioning").await;
    assert_eq!(still["ipConfig"]["v4"]["ip"], "");
    let installing = api.after(1, id, "installing").await;
    assert_eq!(installing["ipConfig"]["v4"]["ip"], "127.0.0.1");
    let v6 = installing["ipConfig"]["v6"]["ip"].as_str().expect("v6");
    assert_eq!(v6.split(':').count(), 8, "fully expanded: {v6}");
    assert!(v6.parse::<std::net::Ipv6Addr>().is_ok());
    assert_eq!(installing["ipConfig"]["v6"]["gateway"], "fe80::1");

    api.after(PHASE_MS - 1, id, "installing").await;
    let running = api.after(1, id, "running").await;
    assert_eq!(running["ipConfig"]["v4"]["ip"], "127.0.0.1");
    let summary = &api.sim.instances()[0];
    assert_eq!(
        (summary.status.as_str(), summary.ipv4.as_deref()),
        ("running", Some("127.0.0.1"))
    );
    assert_eq!(api.sim.instance_count(), 1);
    assert_eq!(api.sim.instances_named("op-1"), 1);
}

#[tokio::test]
async fn create_validates_its_body() {
    let api = Api::default().await;
    let (status, body) = api
        .post("/v1/compute/instances", json!({ "productId": "V1234" }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].is_string(), "{body}");

    let (status, body) = api
        .post(
            "/v1/compute/instances",
            json!({ "region": "MARS", "period": 2, "imageId": "ubuntu", "productId": "" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let messages = body["message"].as_array().expect("array form");
    assert_eq!(messages.len(), 4, "{body}");

    let (status, body) = api
        .post("/v1/compute/instances", json!({ "sshKeys": [424242] }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let password = api.secret("root", "password", "Abc-123!x_").await;
    let (status, _) = api
        .post("/v1/compute/instances", json!({ "sshKeys": [password] }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(api.sim.instance_count(), 0);

    // Not JSON: refused rather than read as `{}` (which would order a default server).
    let (status, _) = api
        .send(
            api.request(Method::POST, "/v1/compute/instances")
                .header("content-type", "text/plain")
                .body("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(api.sim.instance_count(), 0);
}

#[tokio::test]
async fn list_filters_and_paginates() {
    let api = Api::default().await;
    let mut ids = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        ids.push(
            api.create(json!({ "displayName": name, "period": 1 }))
                .await,
        );
    }
    let (status, body) = api.get("/v1/compute/instances").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"].as_array().expect("data").len(), 3);
    assert_eq!(
        body["_links"],
        json!({
            "first": "/v1/compute/instances?size=20",
            "previous": "",
            "next": "",
            "last": "/v1/compute/instances?page=1&size=20",
            "self": "/v1/compute/instances",
        })
    );
    assert_eq!(
        body["_pagination"],
        json!({"size":20,"totalElements":3,"totalPages":1,"page":1})
    );

    let (_, body) = api.get("/v1/compute/instances?displayName=beta").await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["instanceId"], ids[1]);
    assert_eq!(data[0]["displayName"], "beta");

    let (_, body) = api.get("/v1/compute/instances?size=2&page=1").await;
    assert_eq!(body["data"].as_array().expect("data").len(), 2);
    assert_eq!(
        body["_links"]["next"],
        "/v1/compute/instances?page=2&size=2"
    );
    assert_eq!(body["_links"]["previous"], "");
    assert_eq!(body["_pagination"]["totalPages"], 2);
    let (_, body) = api.get("/v1/compute/instances?size=2&page=2").await;
    assert_eq!(body["data"].as_array().expect("data").len(), 1);
    assert_eq!(body["data"][0]["instanceId"], ids[2]);
    assert_eq!(body["_links"]["next"], "");
    assert_eq!(
        body["_links"]["previous"],
        "/v1/compute/instances?page=1&size=2"
    );

    api.sim.set_status(ids[0], "stopped", None);
    api.sim.set_status(ids[1], "stopped", None);
    let (_, body) = api
        .get("/v1/compute/instances?status=error,stopped&search=alp")
        .await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["instanceId"], ids[0]);
    let (status, body) = api.get("/v1/compute/instances?page=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].is_array());

    // orderBy sorts before paging; keys apply in order; a malformed one is refused.
    let ordered = |body: &Value| -> Vec<i64> {
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|i| i["instanceId"].as_i64().expect("id"))
            .collect()
    };
    let mut desc = ids.clone();
    desc.sort_unstable_by(|a, b| b.cmp(a));
    let (_, body) = api
        .get("/v1/compute/instances?orderBy=instanceId:DESC")
        .await;
    assert_eq!(ordered(&body), desc);
    let (_, body) = api
        .get("/v1/compute/instances?orderBy=instanceId:DESC&size=1&page=2")
        .await;
    assert_eq!(ordered(&body), [desc[1]]);
    assert!(
        body["_links"]["next"]
            .as_str()
            .is_some_and(|l| l.contains("orderBy=instanceId%3ADESC")),
        "links keep the order: {body}"
    );
    // alpha and beta are stopped, gamma is not: status first, then name descending.
    let (_, body) = api
        .get("/v1/compute/instances?orderBy=status:ASC&orderBy=displayName:DESC")
        .await;
    let names: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|i| i["displayName"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["gamma", "beta", "alpha"]);
    let (status, _) = api.get("/v1/compute/instances?orderBy=instanceId").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn missing_secrets_answer_404_or_the_500_of_some_accounts() {
    for (mode_500, expected) in [
        (false, StatusCode::NOT_FOUND),
        (true, StatusCode::INTERNAL_SERVER_ERROR),
    ] {
        let api = Api::start(SimConfig {
            missing_secret_500: mode_500,
            ..SimConfig::default()
        })
        .await;
        let (status, body) = api
            .post("/v1/compute/instances", json!({ "sshKeys": [424242] }))
            .await;
        assert_eq!(status, expected, "{body}");
        // SecretVanishes: a secret that existed at lookup is gone by the create.
        let key = api
            .secret(
                "key",
                "ssh",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGcxJ0Xr0x test",
            )
            .await;
        api.sim.inject(Fault::SecretVanishes);
        let (status, _) = api
            .post("/v1/compute/instances", json!({ "sshKeys": [key] }))
            .await;
        assert_eq!(status, expected);
        assert!(!api.sim.secret_ids().contains(&key));
        assert_eq!(api.sim.instance_count(), 0);
    }
}

#[tokio::test]
async fn patch_renames_and_reinstall_reinstalls() {
    let api = Api::manual().await;
    let id = api
        .create(json!({ "displayName": "old", "userData": "#cloud-config\n" }))
        .await;
    let (status, body) = api
        .call(
            Method::PATCH,
            &format!("/v1/compute/instances/{id}"),
            json!({ "displayName": "new" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["instanceId"], id);
    assert_eq!(api.instance(id).await["displayName"], "new");
    let (status, _) = api
        .call(
            Method::PATCH,
            &format!("/v1/compute/instances/{id}"),
            json!({ "productId": "V91" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let running = api.after(2 * PHASE_MS, id, "running").await;
    let path = format!("/v1/compute/instances/{id}");
    let (status, body) = api
        .call(Method::PUT, &path, json!({ "userData": "x" }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["message"], json!(["imageId must be a UUID"]));
    let (status, body) = api
        .call(
            Method::PUT,
            &path,
            json!({ "imageId": UBUNTU_24_04, "userData": "#cloud-config\nruncmd: []\n" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let installing = api.instance(id).await;
    assert_eq!(installing["status"], "installing");
    assert_eq!(installing["imageId"], UBUNTU_24_04);
    assert_eq!(installing["ipConfig"], running["ipConfig"], "IPs kept");
    assert_eq!(
        api.sim.user_data(id).as_deref(),
        Some("#cloud-config\nruncmd: []\n")
    );
    api.after(PHASE_MS, id, "running").await;
}

#[tokio::test]
async fn cancel_sets_the_end_of_term_and_keeps_the_instance_listed() {
    let api = Api::default().await;
    let id = api.create(json!({ "period": 3 })).await;
    let path = format!("/v1/compute/instances/{id}/cancel");
    let (status, body) = api.post(&path, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let instance = api.instance(id).await;
    let created = chrono::DateTime::parse_from_rfc3339(
        instance["createdDate"].as_str().expect("createdDate"),
    )
    .expect("date-time");
    let expected = created
        .date_naive()
        .checked_add_months(chrono::Months::new(3))
        .expect("date")
        .to_string();
    assert_eq!(body["data"][0]["cancelDate"], expected);
    assert_eq!(instance["cancelDate"], expected);

    let (_, list) = api.get("/v1/compute/instances").await;
    assert_eq!(list["data"][0]["instanceId"], id);
    // Cancelling again: 422 (the backend treats "already cancelled" as success).
    let (status, body) = api.post(&path, json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["message"].is_string());
    assert_eq!(api.sim.cancels(), vec![id]);
    assert_eq!(
        api.sim.instances()[0].cancel_date.as_deref(),
        Some(&*expected)
    );
    let (status, _) = api.post("/v1/compute/instances/1/cancel", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn actions_flip_the_status_once_installed() {
    let api = Api::default().await;
    api.sim.inject(Fault::StuckProvisioning);
    let id = api.create(json!({})).await;
    let action = |name: &str| format!("/v1/compute/instances/{id}/actions/{name}");
    let (status, body) = api.post(&action("stop"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "not installed yet: {body}");

    api.sim.set_status(id, "running", None);
    let (status, body) = api.post(&action("stop"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["data"][0]["action"], "stop");
    assert_eq!(body["data"][0]["instanceId"], id);
    assert_eq!(api.instance(id).await["status"], "stopped");
    api.post(&action("start"), json!({})).await;
    assert_eq!(api.instance(id).await["status"], "running");
    api.post(&action("shutdown"), json!({})).await;
    assert_eq!(api.instance(id).await["status"], "stopped");
    let (status, _) = api.post(&action("restart"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(api.instance(id).await["status"], "running");
    let (status, _) = api.post(&action("explode"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let names: Vec<String> = api.sim.actions().into_iter().map(|(_, a)| a).collect();
    assert_eq!(names, ["stop", "start", "shutdown", "restart"]);
    let (_, audits) = api
        .get(&format!(
            "/v1/compute/instances/actions/audits?instanceId={id}"
        ))
        .await;
    assert_eq!(audits["data"].as_array().expect("data").len(), 4);
}

#[tokio::test]
async fn audits_find_a_create_by_request_id() {
    let api = Api::default().await;
    let request_id = rid();
    let resp = api
        .http
        .post(format!("{}/v1/compute/instances", api.sim.api_url))
        .bearer_auth(&api.token)
        .header("x-request-id", &request_id)
        .header("x-trace-id", "trace-7")
        .json(&json!({ "displayName": "audited" }))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = api.sim.instances()[0].instance_id;
    let (status, body) = api
        .get(&format!(
            "/v1/compute/instances/audits?requestId={request_id}"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let rows = body["data"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["action"], "CREATED");
    assert_eq!(row["instanceId"], id);
    assert_eq!(row["requestId"], request_id);
    assert_eq!(row["traceId"], "trace-7");
    assert_eq!(row["username"], "api@example.com");
    for field in [
        "id",
        "timestamp",
        "tenantId",
        "customerId",
        "changedBy",
        "changes",
    ] {
        assert!(!row[field].is_null(), "{field}");
    }
    let (_, none) = api
        .get(&format!("/v1/compute/instances/audits?requestId={}", rid()))
        .await;
    assert_eq!(none["data"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// faults

#[tokio::test]
async fn create_response_lost_creates_once_and_answers_nothing() {
    let api = Api::default().await;
    api.sim.inject(Fault::CreateResponseLost);
    let request_id = rid();
    let result = api
        .http
        .post(format!("{}/v1/compute/instances", api.sim.api_url))
        .bearer_auth(&api.token)
        .header("x-request-id", &request_id)
        .json(&json!({ "displayName": "op-lost" }))
        .send()
        .await;
    let err = result.expect_err("a transport error, not a status");
    assert!(err.status().is_none(), "{err:?}");
    assert_eq!(api.sim.instance_count(), 1);
    assert_eq!(api.sim.instances_named("op-lost"), 1);

    // Reconciliation finds it, both ways.
    let (_, audits) = api
        .get(&format!(
            "/v1/compute/instances/audits?requestId={request_id}"
        ))
        .await;
    assert_eq!(audits["data"].as_array().expect("rows").len(), 1);
    let (_, list) = api.get("/v1/compute/instances?displayName=op-lost").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 1);
    let lost = api
        .sim
        .requests()
        .into_iter()
        .find(|r| r.request_id.as_deref() == Some(&request_id))
        .expect("recorded");
    assert_eq!(lost.status, 0);
    // The next create answers normally.
    api.create(json!({})).await;
    assert_eq!(api.sim.instance_count(), 2);
}

#[tokio::test]
async fn create_fails_500_creates_nothing() {
    let api = Api::default().await;
    api.sim.inject(Fault::CreateFails500);
    let (status, body) = api.post("/v1/compute/instances", json!({})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body,
        json!({"statusCode":500,"message":"Internal Server Error, retry or contact support"})
    );
    assert_eq!(api.sim.instance_count(), 0);
    api.create(json!({})).await;
    assert_eq!(api.sim.instance_count(), 1);
}

#[tokio::test]
async fn rate_limits_and_waf_pages_count_down() {
    let api = Api::default().await;
    api.sim.inject(Fault::RateLimited(2));
    for _ in 0..2 {
        let (status, _) = api.get("/v1/compute/instances").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(api.get("/v1/compute/instances").await.0, StatusCode::OK);

    api.sim.inject(Fault::Html403(1));
    let resp = api
        .request(Method::GET, "/v1/compute/instances")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let text = resp.text().await.expect("body");
    assert!(text.contains("Cloudflare") && serde_json::from_str::<Value>(&text).is_err());
    assert_eq!(api.get("/v1/compute/instances").await.0, StatusCode::OK);
}

#[tokio::test]
async fn stuck_and_failed_instances() {
    let api = Api::default().await;
    api.sim.inject(Fault::StuckProvisioning);
    api.sim
        .inject(Fault::ErrorStatus("Installation failed".into()));
    let stuck = api.create(json!({})).await;
    let failed = api.create(json!({})).await;
    let normal = api.create(json!({})).await;
    api.wait_status(normal, "running").await;
    let failed = api.wait_status(failed, "error").await;
    assert_eq!(failed["errorMessage"], "Installation failed");
    assert_eq!(failed["ipConfig"]["v4"]["ip"], "");
    let stuck = api.instance(stuck).await;
    assert_eq!(stuck["status"], "provisioning");
    assert!(stuck.get("errorMessage").is_none());

    // Forcing a status.
    let id = stuck["instanceId"].as_i64().expect("id");
    api.sim.set_status(id, "product_not_available", None);
    assert_eq!(api.instance(id).await["status"], "product_not_available");
}

#[tokio::test]
async fn expired_tokens_get_401_until_a_new_grant() {
    let config = SimConfig::default();
    let api = Api::start(config.clone()).await;
    assert_eq!(api.get("/v1/compute/instances").await.0, StatusCode::OK);
    api.sim.inject(Fault::ExpireTokens);
    let (status, body) = api.get("/v1/compute/instances").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["message"], "Unauthorized");
    let (status, fresh) = token_request(&api.sim, password_grant(&config)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .send(
            api.http
                .get(format!("{}/v1/compute/instances", api.sim.api_url))
                .bearer_auth(fresh["access_token"].as_str().expect("token"))
                .header("x-request-id", rid()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// snapshots, secrets, images, data centers

#[tokio::test]
async fn snapshots_have_slots_and_rollback_drops_newer_ones() {
    let api = Api::default().await;
    api.sim.inject(Fault::StuckProvisioning);
    let id = api.create(json!({})).await;
    let base = format!("/v1/compute/instances/{id}/snapshots");
    let (status, _) = api.post(&base, json!({ "name": "early" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "not installed yet");
    api.sim.set_status(id, "running", None);

    let (status, body) = api.post(&base, json!({ "name": "bad_name!" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].is_array());
    let (status, _) = api
        .post(
            &base,
            json!({ "name": "a-name-that-is-longer-than-thirty" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut ids = Vec::new();
    for name in ["first one", "second-one"] {
        let (status, body) = api.post(&base, json!({ "name": name })).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let snapshot = &body["data"][0];
        let sid = snapshot["snapshotId"].as_str().expect("id").to_string();
        assert!(
            sid.starts_with("snap") && sid[4..].parse::<u64>().is_ok(),
            "{sid}"
        );
        let created = chrono::DateTime::parse_from_rfc3339(
            snapshot["createdDate"].as_str().expect("created"),
        )
        .expect("date");
        let deleted = chrono::DateTime::parse_from_rfc3339(
            snapshot["autoDeleteDate"].as_str().expect("autoDelete"),
        )
        .expect("date");
        assert_eq!((deleted - created).num_days(), 30);
        assert_eq!(snapshot["imageName"], "ubuntu-22.04");
        ids.push(sid);
    }
    assert_ne!(ids[0], ids[1]);
    let (status, body) = api.post(&base, json!({ "name": "third" })).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        body,
        json!({"statusCode":402,"message":"Total snapshots exceed the total max limit of 2 snapshots"})
    );

    let (_, list) = api.get(&base).await;
    assert_eq!(list["_pagination"]["totalElements"], 2);
    let (status, body) = api
        .post(&format!("{base}/{}/rollback", ids[0]), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("data").is_none() && body["_links"]["self"].is_string());
    let (_, list) = api.get(&base).await;
    let left: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|s| s["snapshotId"].as_str())
        .collect();
    assert_eq!(left, [ids[0].as_str()]);
    assert_eq!(
        api.get(&format!("{base}/{}", ids[1])).await.0,
        StatusCode::NOT_FOUND
    );

    let (status, _) = api
        .send(api.request(Method::DELETE, &format!("{base}/{}", ids[0])))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = api.get(&base).await;
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn secrets_follow_the_password_rule_and_hide_values_in_lists() {
    let api = Api::default().await;
    for bad in ["short1!", "alllowercase12!!", "NoSpecials123", "Abcdefg1!"] {
        let (status, body) = api
            .post(
                "/v1/secrets",
                json!({ "name": "pw", "type": "password", "value": bad }),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["message"].is_array());
    }
    let pw = api.secret("pw", "password", "PwdA?2092w#").await;
    let pw2 = api.secret("pw-two", "password", "Abcdefg1!?").await;
    let key = api
        .secret(
            "dev-key",
            "ssh",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample dev",
        )
        .await;
    assert!(pw != pw2 && pw != key);
    let (status, _) = api
        .post(
            "/v1/secrets",
            json!({ "name": "x", "type": "gpg", "value": "whatever-long" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, list) = api.get("/v1/secrets?type=ssh").await;
    let data = list["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["secretId"], key);
    assert!(data[0].get("value").is_none(), "no value in lists");
    let (_, list) = api.get("/v1/secrets?name=pw").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 2);

    let (status, one) = api.get(&format!("/v1/secrets/{key}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        one["data"][0]["value"],
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample dev"
    );
    let (status, _) = api
        .send(api.request(Method::DELETE, &format!("/v1/secrets/{pw2}")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.get(&format!("/v1/secrets/{pw2}")).await.0,
        StatusCode::NOT_FOUND
    );

    let id = api
        .create(json!({ "sshKeys": [key], "rootPassword": pw }))
        .await;
    assert_eq!(api.instance(id).await["sshKeys"], json!([key]));
}

#[tokio::test]
async fn images_and_data_centers() {
    let api = Api::default().await;
    let (_, body) = api
        .get("/v1/compute/images?standardImage=true&search=ubuntu&size=100")
        .await;
    let images = body["data"].as_array().expect("data");
    let names: Vec<&str> = images.iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(names.contains(&"ubuntu-22.04") && names.contains(&"ubuntu-22.04-cpanel"));
    assert!(!names.iter().any(|n| n.starts_with("debian")));
    let exact = images
        .iter()
        .find(|i| i["name"] == "ubuntu-22.04")
        .expect("ubuntu-22.04");
    assert_eq!(exact["imageId"], UBUNTU_22_04);
    assert_eq!(exact["standardImage"], true);
    assert_eq!(exact["format"], "qcow2");
    assert_eq!(exact["osType"], "Linux");
    let (_, custom) = api.get("/v1/compute/images?standardImage=false").await;
    assert_eq!(custom["data"], json!([]));
    let (_, debian) = api.get("/v1/compute/images?name=debian-12").await;
    assert_eq!(debian["data"][0]["name"], "debian-12");

    let (_, dcs) = api.get("/v1/data-centers?regionSlug=EU").await;
    let dcs = dcs["data"].as_array().expect("data");
    assert!(!dcs.is_empty());
    for dc in dcs {
        assert_eq!(dc["regionName"], "European Union");
        assert!(dc["slug"].as_str().expect("slug").starts_with("EU"));
        assert!(
            dc["capabilities"]
                .as_array()
                .expect("caps")
                .contains(&json!("VPS"))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// fake VPS

/// Pins the host key it was given.
struct Pinned(PublicKey);

impl russh::client::Handler for Pinned {
    type Error = anyhow::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data() == self.0.key_data(),
            _ => false,
        })
    }
}

fn new_key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key")
}

fn cloud_config(host: &PrivateKey, user: &PrivateKey) -> String {
    let pem = host.to_openssh(LineEnding::LF).expect("pem");
    let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "#cloud-config\nssh_genkeytypes: [ed25519]\nssh_keys:\n  ed25519_private: |\n{indented}  ed25519_public: {}\nusers:\n  - default\n  - name: dev\n    shell: /bin/bash\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    ssh_authorized_keys:\n      - {}\n",
        host.public_key().to_openssh().expect("host pub"),
        user.public_key().to_openssh().expect("user pub"),
    )
}

/// A running instance whose userData installs `host` and `user`, and a fake VPS for it.
struct Machine {
    /// Keeps the simulator (the instance's source of truth) alive.
    _api: Api,
    vps: FakeVps,
    host: PrivateKey,
    user: PrivateKey,
}

impl Machine {
    async fn start(config: FakeVpsConfig) -> Self {
        let api = Api::default().await;
        let (host, user) = (new_key(), new_key());
        let key = api
            .secret(
                "devpocket",
                "ssh",
                &user.public_key().to_openssh().expect("pub"),
            )
            .await;
        let vps = FakeVps::start(&api.sim, config).await;
        let id = api
            .create(json!({ "sshKeys": [key], "userData": cloud_config(&host, &user), "displayName": "vps" }))
            .await;
        api.wait_status(id, "running").await;
        Self {
            _api: api,
            vps,
            host,
            user,
        }
    }

    async fn connect_as(
        &self,
        user: &str,
        key: &PrivateKey,
    ) -> (russh::client::Handle<Pinned>, bool) {
        let config = Arc::new(russh::client::Config::default());
        let mut handle = russh::client::connect(
            config,
            ("127.0.0.1", self.vps.port),
            Pinned(self.host.public_key().clone()),
        )
        .await
        .expect("connect");
        let auth = handle
            .authenticate_publickey(
                user,
                PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
            )
            .await
            .expect("auth exchange");
        (handle, auth.success())
    }

    async fn connect(&self) -> russh::client::Handle<Pinned> {
        let (handle, ok) = self.connect_as("dev", &self.user).await;
        assert!(ok, "dev with the installed key logs in");
        handle
    }
}

/// Run one exec; return stdout, stderr, the exit status and whether it came before EOF.
async fn exec(
    handle: &russh::client::Handle<Pinned>,
    command: &str,
    stdin: Option<&[u8]>,
) -> (String, String, Option<u32>) {
    let mut channel = handle.channel_open_session().await.expect("session");
    channel.exec(true, command).await.expect("exec");
    if let Some(input) = stdin {
        channel.data(input).await.expect("stdin");
        channel.eof().await.expect("eof");
    }
    let (mut out, mut err, mut code, mut eof_seen) = (Vec::new(), Vec::new(), None, false);
    let read = async {
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => err.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => {
                    assert!(!eof_seen, "exit status before EOF");
                    code = Some(exit_status);
                }
                ChannelMsg::Eof => eof_seen = true,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("command finishes");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code,
    )
}

fn lines(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("install step {i}")).collect()
}

#[tokio::test]
async fn fake_vps_pins_the_host_key_and_runs_commands() {
    let machine = Machine::start(FakeVpsConfig {
        install_lines: lines(3),
        line_delay_ms: 2,
        cloud_init_exit: 0,
        without_tmux: false,
    })
    .await;
    let handle = machine.connect().await;

    let (out, _, code) = exec(&handle, "echo hi", None).await;
    assert_eq!((out.as_str(), code), ("hi\n", Some(0)));
    let (out, err, code) = exec(&handle, "echo oops >&2; exit 3", None).await;
    assert_eq!((out.as_str(), err.as_str(), code), ("", "oops\n", Some(3)));
    let (out, _, code) = exec(&handle, "head -1 /proc/stat", None).await;
    assert!(out.starts_with("cpu "), "{out}");
    assert_eq!(code, Some(0));
    let (out, _, _) = exec(&handle, "tr a-z A-Z", Some(b"piped\n")).await;
    assert_eq!(out, "PIPED\n");

    let (out, _, code) = exec(&handle, "cloud-init status --wait", None).await;
    assert!(out.ends_with("status: done\n"), "{out:?}");
    assert_eq!(code, Some(0));
    assert_eq!(machine.vps.connections(), 1);
    assert_eq!(
        machine.vps.commands(),
        [
            "echo hi",
            "echo oops >&2; exit 3",
            "head -1 /proc/stat",
            "tr a-z A-Z",
            "cloud-init status --wait"
        ]
    );
}

#[tokio::test]
async fn fake_vps_streams_the_install_log_like_tail_f() {
    let machine = Machine::start(FakeVpsConfig {
        install_lines: lines(5),
        line_delay_ms: 3,
        cloud_init_exit: 0,
        without_tmux: false,
    })
    .await;
    let handle = machine.connect().await;
    let mut channel = handle.channel_open_session().await.expect("session");
    channel
        .exec(true, "sudo -n tail -n +1 -F /var/log/cloud-init-output.log")
        .await
        .expect("exec");
    let mut text = String::new();
    let read = async {
        while text.lines().count() < 5 {
            match channel.wait().await {
                Some(ChannelMsg::Data { data }) => text.push_str(&String::from_utf8_lossy(&data)),
                Some(ChannelMsg::Success) | Some(ChannelMsg::WindowAdjusted { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("all lines");
    assert_eq!(text, lines(5).join("\n") + "\n");
    // Still open, like tail -F.
    assert!(
        tokio::time::timeout(Duration::from_millis(30), channel.wait())
            .await
            .is_err()
    );
    channel.close().await.expect("close");

    // Without -F: what has been written so far, then exit 0.
    let (out, _, code) = exec(&handle, "sudo -n cat /var/log/cloud-init-output.log", None).await;
    assert_eq!(out, lines(5).join("\n") + "\n");
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn fake_vps_cloud_init_status_exits_with_the_configured_code() {
    for (exit, word) in [(1, "error"), (2, "done")] {
        let machine = Machine::start(FakeVpsConfig {
            install_lines: lines(4),
            line_delay_ms: 5,
            cloud_init_exit: exit,
            without_tmux: false,
        })
        .await;
        let handle = machine.connect().await;
        let (out, _, code) = exec(&handle, "sudo -n cloud-init status --wait", None).await;
        assert!(out.ends_with(&format!("status: {word}\n")), "{out:?}");
        assert_eq!(code, Some(exit));
        let (out, _, _) = exec(&handle, "cloud-init status --format json", None).await;
        let status: Value = serde_json::from_str(&out).expect("json status");
        assert_eq!(status["status"], word);
    }
}

#[tokio::test]
async fn fake_vps_rejects_strangers() {
    let machine = Machine::start(FakeVpsConfig::default()).await;
    let (_, ok) = machine.connect_as("dev", &new_key()).await;
    assert!(!ok, "a key that is not installed");
    let (_, ok) = machine.connect_as("root", &machine.user).await;
    assert!(!ok, "another user");

    // A client pinning another host key refuses the server.
    let result = russh::client::connect(
        Arc::new(russh::client::Config::default()),
        ("127.0.0.1", machine.vps.port),
        Pinned(new_key().public_key().clone()),
    )
    .await;
    assert!(result.is_err());
    let (_, ok) = machine.connect_as("dev", &machine.user).await;
    assert!(ok);
}

#[tokio::test]
async fn fake_vps_is_unreachable_until_the_instance_runs() {
    let api = Api::default().await;
    let vps = FakeVps::start(&api.sim, FakeVpsConfig::default()).await;
    let (host, user) = (new_key(), new_key());
    api.sim.inject(Fault::StuckProvisioning);
    let id = api
        .create(json!({ "userData": cloud_config(&host, &user) }))
        .await;
    let attempt = russh::client::connect(
        Arc::new(russh::client::Config::default()),
        ("127.0.0.1", vps.port),
        Pinned(host.public_key().clone()),
    )
    .await;
    assert!(attempt.is_err(), "provisioning: no SSH yet");
    assert_eq!(vps.connections(), 0);
    api.sim.set_status(id, "running", None);
    let handle = russh::client::connect(
        Arc::new(russh::client::Config::default()),
        ("127.0.0.1", vps.port),
        Pinned(host.public_key().clone()),
    )
    .await;
    assert!(handle.is_ok());
    assert_eq!(vps.connections(), 1);
}

#[tokio::test]
async fn fake_vps_shell_with_a_pty_runs_bash() {
    let machine = Machine::start(FakeVpsConfig::default()).await;
    let handle = machine.connect().await;
    let mut channel = handle.channel_open_session().await.expect("session");
    channel
        .request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .expect("pty");
    channel.request_shell(true).await.expect("shell");
    channel
        .data(&b"echo pty-$((40+2)); exit 7\n"[..])
        .await
        .expect("input");
    let (mut text, mut code) = (String::new(), None);
    let read = async {
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => text.push_str(&String::from_utf8_lossy(&data)),
                ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("shell exits");
    assert!(text.contains("pty-42"), "{text:?}");
    assert_eq!(code, Some(7));
}
