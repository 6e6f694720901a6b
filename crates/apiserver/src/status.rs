//! Errors as Kubernetes `Status` objects. Only this module knows HTTP status codes for errors.

use axum::body::Body;
use axum::http::{Response, StatusCode, header};
use serde_json::{Value, json};
use tugboat_store::StoreError;

/// A field-level cause of an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueDuplicate`, ...
    pub reason: &'static str,
    pub message: String,
    /// `metadata.name`, `spec.containers[1].name`, ...
    pub field: String,
}

/// A request that cannot be served, as the client will see it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, ...
    pub reason: &'static str,
    pub message: String,
    pub name: Option<String>,
    /// The group of the resource, if any.
    pub group: Option<String>,
    /// The resource (plural) or kind the error is about.
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
    /// A list's continuation the error carries (`metadata.continue`): the inconsistent
    /// continuation of a continue token compacted away.
    pub continue_token: Option<String>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
            continue_token: None,
        }
    }

    fn about(mut self, group: &str, resource: &str, name: &str) -> Self {
        self.group = Some(group.to_string()).filter(|g| !g.is_empty());
        self.kind = Some(resource.to_string());
        self.name = Some(name.to_string()).filter(|n| !n.is_empty());
        self
    }

    /// `pods "web" is forbidden: <why>`, as upstream's admission refusals.
    pub fn forbidden(group: &str, resource: &str, name: &str, why: &str) -> Self {
        let qualified = qualified(group, resource);
        ApiError::new(403, "Forbidden", format!("{qualified} \"{name}\" is forbidden: {why}"))
            .about(group, resource, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn not_found_path(path: &str) -> Self {
        ApiError::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }

    /// `pods "web" not found`
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        let qualified = qualified(group, resource);
        ApiError::new(404, "NotFound", format!("{qualified} \"{name}\" not found")).about(group, resource, name)
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        let qualified = qualified(group, resource);
        ApiError::new(409, "AlreadyExists", format!("{qualified} \"{name}\" already exists"))
            .about(group, resource, name)
    }

    pub fn conflict(group: &str, resource: &str, name: &str) -> Self {
        let qualified = qualified(group, resource);
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {qualified} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
        )
        .about(group, resource, name)
    }

    /// `Pod "x" is invalid: spec.containers: Required value`
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let summary: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let summary = if summary.len() == 1 { summary[0].clone() } else { format!("[{}]", summary.join(", ")) };
        let mut error = ApiError::new(422, "Invalid", format!("{kind} \"{name}\" is invalid: {summary}"));
        error.group = Some(group.to_string()).filter(|g| !g.is_empty());
        error.kind = Some(kind.to_string());
        error.name = Some(name.to_string()).filter(|n| !n.is_empty());
        error.causes = causes;
        error
    }

    pub fn method_not_allowed(method: &str) -> Self {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    /// 406: nothing the client accepts can be produced (a Table of an object without
    /// metadata, such as a review).
    pub fn not_acceptable(accept: &str) -> Self {
        ApiError::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf (asked for {accept:?})"
            ),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/merge-patch+json, application/json-patch+json (got {content_type:?})"
            ),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 410 Gone: the requested history was compacted.
    pub fn expired(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError::new(504, "Timeout", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// A store error while serving `resource`/`name`.
    pub fn from_store(error: StoreError, group: &str, resource: &str, name: &str) -> Self {
        match error {
            StoreError::NotFound { .. } => ApiError::not_found(group, resource, name),
            StoreError::AlreadyExists { .. } => ApiError::already_exists(group, resource, name),
            StoreError::Conflict { .. } => ApiError::conflict(group, resource, name),
            StoreError::Compacted { requested, compacted } => {
                ApiError::expired(format!("too old resource version: {requested} ({compacted})"))
            }
            StoreError::FutureRevision { requested, current } => {
                ApiError::timeout(format!("Too large resource version: {requested}, current: {current}"))
            }
            StoreError::InvalidContinue { reason } => {
                ApiError::bad_request(format!("invalid continue token: {reason}"))
            }
            other if other.is_request_error() => ApiError::bad_request(other.to_string()),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::unavailable(format!("the store cannot serve the request: {other}"))
            }
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut details = serde_json::Map::new();
        if let Some(name) = &self.name {
            details.insert("name".into(), json!(name));
        }
        if let Some(group) = &self.group {
            details.insert("group".into(), json!(group));
        }
        if let Some(kind) = &self.kind {
            details.insert("kind".into(), json!(kind));
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        if let Some(token) = &self.continue_token {
            status["metadata"]["continue"] = json!(token);
        }
        status
    }

    pub fn into_response(self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(Body::from(self.to_status().to_string()));
        *response.status_mut() = code;
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        response
    }
}

/// `pods`, `deployments.apps`: how upstream names a resource in messages.
fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_reads_like_upstream() {
        let status = ApiError::not_found("", "pods", "nope").to_status();
        assert_eq!(status["message"], "pods \"nope\" not found");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["kind"], "pods");
        let status = ApiError::not_found("apps", "deployments", "web").to_status();
        assert_eq!(status["message"], "deployments.apps \"web\" not found");
    }

    #[test]
    fn invalid_lists_the_field_causes() {
        let cause =
            Cause { reason: "FieldValueRequired", message: "Required value".into(), field: "spec.containers".into() };
        let status = ApiError::invalid("", "Pod", "p", vec![cause]).to_status();
        assert_eq!(status["message"], "Pod \"p\" is invalid: spec.containers: Required value");
        assert_eq!(status["details"]["causes"][0]["field"], "spec.containers");
        assert_eq!(status["code"], 422);
    }
}
