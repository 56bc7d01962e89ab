//! The API's contract through the real server (issue 8 §7): common breached passwords are refused,
//! admin template rendering is bounded, any JSON route given a non-object body answers 422, and the
//! served OpenAPI document lists every status a route answers and matches what is served.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, PASSWORD, TestServer};

on_both_backends!(
    common_passwords_are_refused_on_register_and_password_change,
    runaway_admin_templates_are_refused,
    non_object_json_bodies_are_422,
    served_templates_match_the_documented_schema,
);

/// The field errors of a 422, as (field, code).
fn field_errors(body: &Value) -> Vec<(String, String)> {
    body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or_default().to_string(),
                        e["code"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn common_passwords_are_refused_on_register_and_password_change(backend: Backend) {
    let s = TestServer::start(backend).await;
    for (i, common) in ["Password1", "Passw0rd", "Qwerty123", "QWERTY123a"]
        .into_iter()
        .enumerate()
    {
        let (status, body) = s
            .post(
                "/api/v1/auth/register",
                None,
                json!({ "username": format!("common{i}"), "email": format!("common{i}@example.com"), "password": common }),
            )
            .await;
        if common == "QWERTY123a" {
            // Not on the list: the rule is a list match, not a pattern.
            assert_eq!(status, StatusCode::CREATED, "{common}: {body}");
            continue;
        }
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{common}: {body}");
        assert_eq!(body["code"], "validation_error");
        assert_eq!(
            field_errors(&body),
            [("password".to_string(), "common_password".to_string())],
            "{common}"
        );
        // Nothing was created: the name is still free.
        let (status, _) = s.login(&format!("common{i}"), common).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{common}");
    }

    let alice = s.register("alice").await;
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            alice.token(),
            json!({ "current_password": PASSWORD, "new_password": "pASSW0RD" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        field_errors(&body),
        [("new_password".to_string(), "common_password".to_string())]
    );
    // The old password still works, and an uncommon one is accepted.
    assert_eq!(s.login("alice", PASSWORD).await.0, StatusCode::OK);
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            alice.token(),
            json!({ "current_password": PASSWORD, "new_password": "Harbour-Lantern-58" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        s.login("alice", "Harbour-Lantern-58").await.0,
        StatusCode::OK
    );
    s.stop().await;
}

fn template_with(name: &str, user_data: &str) -> Value {
    let mut template = serde_json::to_value(
        devpocket::templates::parse(include_str!("../templates/ubuntu.yaml")).expect("parses"),
    )
    .expect("json");
    template["name"] = json!(name);
    template["user_data"] = json!(user_data);
    template
}

async fn runaway_admin_templates_are_refused(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("boss").await;
    let shipped = devpocket::templates::parse(include_str!("../templates/ubuntu.yaml"))
        .expect("parses")
        .user_data;
    for (name, extra) in [
        ("loop", "{% for i in range(100000000) %}x{% endfor %}"),
        (
            "nested",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
        (
            "expands",
            "{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}",
        ),
    ] {
        let user_data =
            shipped.replacen("#cloud-config\n", &format!("#cloud-config\n{extra}\n"), 1);
        let (status, body) = s
            .post(
                "/api/v1/templates",
                admin.token(),
                template_with(name, &user_data),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
        assert_eq!(body["code"], "validation_error", "{name}");
        assert_eq!(
            field_errors(&body),
            [("template".to_string(), "invalid".to_string())],
            "{name}"
        );
        let (status, _) = s.get(&format!("/api/v1/templates/{name}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name} was not stored");
        // Replacing an existing template with it is refused the same way.
        let (status, body) = s
            .send(
                s.request(Method::PUT, "/api/v1/templates/ubuntu", admin.token())
                    .json(&template_with("ubuntu", &user_data)),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
    }
    // The server is still answering, and a normal template still passes.
    let (status, body) = s
        .post(
            "/api/v1/templates",
            admin.token(),
            template_with("fine", &shipped),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    s.stop().await;
}

async fn non_object_json_bodies_are_422(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("boss").await;
    let before = s.get("/api/v1/users/me", admin.token()).await.1;
    let routes: [(Method, &str, Option<&str>); 6] = [
        (Method::PUT, "/api/v1/users/me", admin.token()),
        (Method::POST, "/api/v1/auth/register", None),
        (Method::POST, "/api/v1/auth/login", None),
        (Method::POST, "/api/v1/users/me/password", admin.token()),
        (Method::POST, "/api/v1/environments", admin.token()),
        (Method::POST, "/api/v1/templates", admin.token()),
    ];
    for (method, path, token) in routes {
        for body in [
            json!([]),
            json!(["x", "y"]),
            json!("text"),
            json!(42),
            json!(true),
            Value::Null,
        ] {
            let (status, answer) = s
                .send(
                    s.request(method.clone(), path, token)
                        .header("content-type", "application/json")
                        .body(body.to_string()),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{method} {path} {body}: {answer}"
            );
            assert_eq!(answer["code"], "validation_error");
            assert_eq!(
                field_errors(&answer),
                [("body".to_string(), "type".to_string())],
                "{method} {path} {body}"
            );
        }
    }
    // Malformed JSON stays a 400; an object still works.
    let (status, answer) = s
        .send(
            s.request(Method::PUT, "/api/v1/users/me", admin.token())
                .header("content-type", "application/json")
                .body("[1,"),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    assert_eq!(s.get("/api/v1/users/me", admin.token()).await.1, before);
    let (status, answer) = s
        .send(
            s.request(Method::PUT, "/api/v1/users/me", admin.token())
                .json(&json!({ "full_name": "Boss B" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["full_name"], "Boss B");
    s.stop().await;
}

/// A minimal check of `value` against a schema of the served document: types, required
/// properties, `$ref`s, `allOf` and array items (what the document uses).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            conforms(doc, part, value, at)?;
        }
        return Ok(());
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !ok {
            return Err(format!("{at}: {actual}, documented {types:?}"));
        }
    }
    if let Some(required) = schema["required"].as_array() {
        for field in required.iter().filter_map(Value::as_str) {
            if value.get(field).is_none() {
                return Err(format!("{at}.{field} is required but not served"));
            }
        }
    }
    if let (Some(properties), Some(object)) = (schema["properties"].as_object(), value.as_object())
    {
        for (field, sub) in properties {
            if let Some(v) = object.get(field) {
                conforms(doc, sub, v, &format!("{at}.{field}"))?;
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

async fn served_templates_match_the_documented_schema(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, doc) = s.get("/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let list_schema = &doc["paths"]["/api/v1/templates"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"];
    let one_schema = &doc["paths"]["/api/v1/templates/{template_id}"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"];
    let (status, list) = s.get("/api/v1/templates", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!list.as_array().expect("list").is_empty());
    conforms(&doc, list_schema, &list, "templates").expect("GET /api/v1/templates");
    let (status, one) = s.get("/api/v1/templates/ubuntu", None).await;
    assert_eq!(status, StatusCode::OK);
    conforms(&doc, one_schema, &one, "template").expect("GET /api/v1/templates/ubuntu");
    // The schema check can fail: the old schema required user_data, which is never served.
    let old = json!({ "type": "object", "required": ["name", "user_data"] });
    assert!(conforms(&doc, &old, &one, "template").is_err());

    // What admins post is its own schema, and that one requires user_data.
    let post = &doc["paths"]["/api/v1/templates"]["post"];
    let input = &post["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(input, "#/components/schemas/TemplateInput");
    assert!(
        doc["components"]["schemas"]["TemplateInput"]["required"]
            .as_array()
            .expect("required")
            .contains(&json!("user_data"))
    );
    let admin = s.admin("boss").await;
    let (status, created) = s
        .post(
            "/api/v1/templates",
            admin.token(),
            template_with(
                "custom",
                &devpocket::templates::parse(include_str!("../templates/ubuntu.yaml"))
                    .expect("parses")
                    .user_data,
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    conforms(
        &doc,
        &post["responses"]["201"]["content"]["application/json"]["schema"],
        &created,
        "created",
    )
    .expect("POST /api/v1/templates");
    s.stop().await;
}

/// The served document lists, for every operation, the statuses its route class can answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_lists_every_status() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (status, doc) = s.get("/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            operations += 1;
            let name = format!("{method} {path}");
            let responses = op["responses"].as_object().expect("responses");
            let has = |status: &str| responses.contains_key(status);
            assert!(has("503"), "{name}: 503");
            if op["x-websocket"] == true {
                assert!(has("400"), "{name}: 400 without an upgrade");
                continue;
            }
            if op.get("security").is_some() {
                assert!(has("401"), "{name}: authenticated operations document 401");
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "422"] {
                    assert!(has(status), "{name}: a JSON body documents {status}");
                }
            }
            if path.contains('{') {
                assert!(has("404"), "{name}: path parameters document 404");
            }
            for (status, answer) in responses {
                if status.starts_with('4') {
                    assert_eq!(
                        answer["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error",
                        "{name} {status}"
                    );
                }
            }
        }
    }
    assert!(operations > 40, "{operations} operations");
    // What the issue named: admin routes document 403, rate-limited ones 429, login 423.
    assert!(doc["paths"]["/api/v1/admin/audit"]["get"]["responses"]["403"].is_object());
    assert!(doc["paths"]["/api/v1/auth/login"]["post"]["responses"]["429"].is_object());
    assert!(doc["paths"]["/api/v1/auth/login"]["post"]["responses"]["423"].is_object());
    assert!(doc["paths"]["/api/v1/environments"]["post"]["responses"]["409"].is_object());

    // Answers the server really gives are documented: a few a client meets every day.
    let (status, _) = s.get("/api/v1/users/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = s.get("/api/v1/templates/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let user = s.register("bob").await;
    let (status, _) = s.get("/api/v1/admin/audit", user.token()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    s.stop().await;
}
