//! Checks API responses against docs/api/openapi.json: the operation must
//! be described, the status listed, and a JSON body must match its schema
//! (the JSON-Schema subset the document uses: $ref, type, properties,
//! required, additionalProperties, enum, items, anyOf, minimum, maximum).

use serde_json::Value;

/// The API description, read once per test process.
pub fn document() -> &'static Value {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.json");
        let text = std::fs::read_to_string(path).expect("read openapi.json");
        serde_json::from_str(&text).expect("openapi.json is JSON")
    })
}

/// The path template of the document that `path` matches.
fn template_for(doc: &Value, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let want: Vec<&str> = path.split('/').collect();
    doc["paths"].as_object()?.keys().find_map(|template| {
        let have: Vec<&str> = template.split('/').collect();
        let matches = have.len() == want.len()
            && have
                .iter()
                .zip(&want)
                .all(|(h, w)| h == w || (h.starts_with('{') && !w.is_empty()));
        matches.then(|| template.clone())
    })
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

fn type_ok(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// Validates `value` against `schema`; the error names the place.
pub fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        if options.iter().any(|s| validate(doc, s, value, at).is_ok()) {
            return Ok(());
        }
        return Err(format!("{at}: {value} matches no alternative"));
    }
    match &schema["type"] {
        Value::String(t) if !type_ok(value, t) => {
            return Err(format!("{at}: {value} is not of type {t}"));
        }
        Value::Array(ts) if !ts.iter().any(|t| type_ok(value, t.as_str().unwrap_or(""))) => {
            return Err(format!("{at}: {value} is not of types {ts:?}"));
        }
        _ => {}
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} is below {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), value.as_f64()) {
        if n > max {
            return Err(format!("{at}: {n} is above {max}"));
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(object) = value.as_object() {
        let props = schema["properties"].as_object();
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or("");
            if !object.contains_key(key) {
                return Err(format!("{at}: required '{key}' missing"));
            }
        }
        for (key, item) in object {
            match props.and_then(|p| p.get(key)) {
                Some(s) => validate(doc, s, item, &format!("{at}.{key}"))?,
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Err(format!("{at}: '{key}' is not in the schema"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Checks one response: the operation and status are described, and a
/// JSON body matches the schema of that status.
pub fn check_response(method: &str, path: &str, status: u16, body: &[u8]) -> Result<(), String> {
    let doc = document();
    let error_reply = |status: u16| -> Result<(), String> {
        // Unknown paths (404) answer with an Error, as the document's
        // description says; a method a path lacks (405) with the
        // MethodNotAllowed response of its components.
        let schema = match status {
            405 => doc["components"]["responses"]["MethodNotAllowed"]["content"]
                ["application/json"]
                .get("schema")
                .ok_or("components.responses.MethodNotAllowed is not described")?,
            _ => &doc["components"]["schemas"]["Error"],
        };
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{method} {path} {status}: body is not JSON: {e}"))?;
        validate(doc, schema, &value, path)
    };
    let Some(template) = template_for(doc, path) else {
        return match status {
            404 => error_reply(status),
            _ => Err(format!("{path} is not in openapi.json")),
        };
    };
    let operation = &doc["paths"][&template][method.to_ascii_lowercase()];
    if operation.is_null() {
        return match status {
            405 => error_reply(status),
            _ => Err(format!("{method} {template} is not in openapi.json")),
        };
    }
    let response = &operation["responses"][status.to_string()];
    if response.is_null() {
        return Err(format!(
            "{method} {template}: status {status} is not in openapi.json"
        ));
    }
    let content = &response["content"];
    if let Some(schema) = content["application/json"].get("schema") {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{method} {path}: body is not JSON: {e}"))?;
        validate(
            doc,
            schema,
            &value,
            &format!("{method} {template} {status}"),
        )?;
    } else if content.get("text/plain").is_none() && !body.is_empty() && status != 101 {
        return Err(format!("{method} {template} {status}: undocumented body"));
    }
    Ok(())
}

/// Checks one request against the document: the operation is described,
/// each query parameter is one it lists with a value of its schema (an
/// integer within its bounds), and a body is sent exactly when the
/// operation takes one and matches its schema.
pub fn check_request(method: &str, path: &str, body: Option<&Value>) -> Result<(), String> {
    let doc = document();
    let template =
        template_for(doc, path).ok_or_else(|| format!("{path} is not in openapi.json"))?;
    let operation = &doc["paths"][&template][method.to_ascii_lowercase()];
    if operation.is_null() {
        return Err(format!("{method} {template} is not in openapi.json"));
    }
    let params = operation["parameters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let query = path.split_once('?').map_or("", |(_, q)| q);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, text) = pair.split_once('=').unwrap_or((pair, ""));
        let param = params
            .iter()
            .find(|p| p["in"] == "query" && p["name"] == key)
            .ok_or_else(|| {
                format!("{method} {template}: query parameter '{key}' is not described")
            })?;
        let value = match param["schema"]["type"].as_str() {
            Some("integer") => text
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("{method} {template}: {key}={text} is not an integer"))?,
            _ => Value::from(text),
        };
        validate(
            doc,
            &param["schema"],
            &value,
            &format!("{method} {template} ?{key}"),
        )?;
    }
    let schema = operation["requestBody"]["content"]["application/json"].get("schema");
    match (schema, body) {
        (Some(schema), Some(body)) => {
            validate(doc, schema, body, &format!("{method} {template} body"))
        }
        (Some(_), None) if operation["requestBody"]["required"] == true => {
            Err(format!("{method} {template}: the body is required"))
        }
        (None, Some(_)) => Err(format!("{method} {template} takes no body")),
        _ => Ok(()),
    }
}

/// Checks one event line against the Event schema.
pub fn check_event(event: &Value) -> Result<(), String> {
    let doc = document();
    validate(doc, &doc["components"]["schemas"]["Event"], event, "event")
}

#[test]
fn the_validator_refuses_what_the_schema_forbids() {
    let doc = document();
    let error = &doc["components"]["schemas"]["Error"];
    assert!(validate(doc, error, &serde_json::json!({"error": "x"}), "e").is_ok());
    assert!(validate(doc, error, &serde_json::json!({"error": 1}), "e").is_err());
    assert!(validate(doc, error, &serde_json::json!({}), "e").is_err());
    assert!(validate(
        doc,
        error,
        &serde_json::json!({"error": "x", "more": 1}),
        "e"
    )
    .is_err());
    let info = &doc["components"]["schemas"]["GuestSummary"];
    let mut guest = serde_json::json!({
        "name": "a", "state": "running", "vcpus": 1, "memory_bytes": 1, "pid": 3,
        "exit": null, "cpu_time_ms": null, "exits": 5, "uptime_ms": 1, "vcpu_tids": [4],
        "memory": {"backing": "anonymous", "resident_bytes": 4096, "huge_bytes": 0},
        "stale": false
    });
    assert!(validate(doc, info, &guest, "g").is_ok());
    guest["state"] = "dancing".into();
    assert!(validate(doc, info, &guest, "g").is_err());
    guest["state"] = "stopped".into();
    guest["exit"] = serde_json::json!({"status": null});
    assert!(validate(doc, info, &guest, "g").is_err());
    assert!(check_response("GET", "/guests/a", 418, b"{}").is_err());
    assert!(check_response("PUT", "/guests/a", 200, b"{}").is_err());
    assert!(check_response("PUT", "/guests/a", 405, b"{}").is_err());
    assert!(check_response("PUT", "/guests/a", 405, br#"{"error":"no"}"#).is_ok());
    assert!(check_response("GET", "/nowhere", 200, b"{}").is_err());
}

#[test]
fn the_validator_checks_requests_too() {
    let good = serde_json::json!({"name": "a", "config": "kernel = \"/k\"\n", "start": true});
    assert!(check_request("POST", "/guests", Some(&good)).is_ok());
    for bad in [
        serde_json::json!({"config": "x"}),
        serde_json::json!({"name": "a", "config": 5}),
        serde_json::json!({"name": "a", "config": "x", "start": "yes"}),
        serde_json::json!({"name": "a", "config": "x", "extra": 1}),
        serde_json::json!([1]),
    ] {
        assert!(
            check_request("POST", "/guests", Some(&bad)).is_err(),
            "{bad}"
        );
    }
    assert!(check_request("POST", "/guests", None).is_err());
    assert!(check_request("GET", "/guests", Some(&good)).is_err());
    assert!(check_request("POST", "/guests/a/stop?timeout=5", None).is_ok());
    assert!(check_request("POST", "/guests/a/stop?timeout=soon", None).is_err());
    assert!(check_request("POST", "/guests/a/stop?timeout=3601", None).is_err());
    assert!(check_request("POST", "/guests/a/stop?wait=5", None).is_err());
    assert!(check_request("POST", "/guests/a/start?timeout=5", None).is_err());
    assert!(check_request("GET", "/guests/a/console?tail=3", None).is_ok());
    assert!(check_request("GET", "/guests/a/console?tail=lots", None).is_err());
    assert!(check_request("PUT", "/guests", None).is_err());
}
