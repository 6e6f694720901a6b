//! What a request carries besides its object: its query, and for a write who writes
//! ([`Write`]: the field manager, dry run, field validation, the user admission sees) and the
//! warnings it collects for the client.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::object;
use crate::registry::Resource;
use crate::selector::{FieldSelector, LabelSelector, supported_fields};
use crate::status::ApiError;

pub(crate) type Query = HashMap<String, String>;

/// Who writes (the field manager, for managedFields) and whether for real.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub(crate) manager: String,
    pub(crate) dry_run: bool,
    /// A server-side apply, which records its own managedFields.
    pub(crate) apply: bool,
    pub(crate) validation: FieldValidation,
    /// Warnings for the client (`Warning` headers of the response).
    pub(crate) warnings: Arc<std::sync::Mutex<Vec<String>>>,
    /// Fields the body named twice (found as it is decoded), reported with the unknown ones.
    pub(crate) duplicates: Arc<std::sync::Mutex<Vec<String>>>,
    /// Who asks (for admission webhooks).
    pub(crate) user: Option<UserInfo>,
    /// Whether admission webhooks see the write: a client's, not the server's own.
    pub(crate) admit: bool,
}

impl Write {
    /// A write the server makes on its own behalf (a controller of its own), as `manager`.
    pub(crate) fn internal(manager: &str) -> Write {
        Write {
            manager: manager.to_string(),
            dry_run: false,
            apply: false,
            validation: FieldValidation::Ignore,
            warnings: Default::default(),
            duplicates: Default::default(),
            user: None,
            admit: false,
        }
    }

    /// The options object of the write, as an AdmissionReview carries it.
    pub(crate) fn options(&self, kind: &str) -> Value {
        let mut options = json!({"kind": kind, "apiVersion": "meta.k8s.io/v1", "fieldManager": self.manager});
        if self.dry_run {
            options["dryRun"] = json!(["All"]);
        }
        options
    }

    /// Adds warnings for the client.
    pub(crate) fn warn(&self, warnings: impl IntoIterator<Item = String>) {
        self.warnings.lock().unwrap_or_else(|e| e.into_inner()).extend(warnings);
    }

    /// Looks for fields a JSON body names twice, unless they are to be ignored.
    pub(crate) fn note_duplicates(&self, content_type: &str, body: &[u8]) {
        if self.validation != FieldValidation::Ignore {
            *self.duplicates.lock().unwrap_or_else(|e| e.into_inner()) = object::duplicate_fields(content_type, body);
        }
    }

    /// As [`Write::check_fields`], for a server-side apply: an unknown field under Strict is
    /// upstream's typed-patch error (`.spec.foo: field not declared in schema`).
    pub(crate) fn check_applied_fields(
        &self,
        resource: &Resource,
        object: &mut Value,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ApiError> {
        if self.validation != FieldValidation::Strict {
            return self.check_fields(resource, object);
        }
        let unknown = match resource.custom {
            Some(custom) => crate::custom::prune(custom, object),
            None => crate::schema::schemas().prune_unknown(resource, object),
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = unknown.iter().map(|f| format!(".{f}: field not declared in schema")).collect();
        let group_version = resource.api_version();
        Err(ApiError::bad_request(format!(
            "failed to create typed patch object ({}/{name}; {group_version}, Kind={}): {}",
            namespace.unwrap_or_default(),
            resource.kind,
            fields.join(", ")
        )))
    }

    /// Drops the fields of `object` its kind does not declare, as upstream's decoder does; under
    /// `fieldValidation=Strict` they are an error, under Warn (the default) a warning each.
    pub(crate) fn check_fields(&self, resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
        let unknown = match resource.custom {
            Some(custom) => crate::custom::prune(custom, object),
            None => crate::schema::schemas().prune_unknown(resource, object),
        };
        let duplicates = std::mem::take(&mut *self.duplicates.lock().unwrap_or_else(|e| e.into_inner()));
        if unknown.is_empty() && duplicates.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .chain(duplicates.iter().map(|f| format!("duplicate field {f:?}")))
            .collect();
        match self.validation {
            FieldValidation::Strict => {
                let mut error = ApiError::bad_request(format!(
                    "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                    fields.join(", "),
                    kind = resource.kind,
                    version = resource.version,
                ));
                error.causes = unknown
                    .iter()
                    .chain(&duplicates)
                    .zip(&fields)
                    .map(|(f, message)| crate::status::Cause {
                        reason: if message.starts_with("duplicate") {
                            "FieldValueDuplicate"
                        } else {
                            "FieldValueInvalid"
                        },
                        message: message.clone(),
                        field: f.clone(),
                    })
                    .collect();
                Err(error)
            }
            FieldValidation::Warn => {
                let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
                warnings.extend(fields);
                Ok(())
            }
            FieldValidation::Ignore => Ok(()),
        }
    }
}

/// `?fieldValidation=`: what to do with fields the schema does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    pub(crate) fn from_query(query: &Query) -> Result<FieldValidation, ApiError> {
        match query.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }
}

/// The field manager: `?fieldManager=`, else the client's name from its User-Agent
/// (`kubectl/v1.31.9 (linux/amd64) ...` gives `kubectl`), as upstream derives it.
pub(crate) fn field_manager(query: &Query, headers: &HeaderMap) -> String {
    if let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return manager.chars().take(128).collect();
    }
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    agent.split('/').next().unwrap_or("unknown").chars().take(128).collect()
}

pub(crate) struct Filters {
    plural: &'static str,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filters {
    pub(crate) fn from_query(resource: &Resource, query: &Query) -> Result<Filters, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let mut supported: Vec<&str> = supported_fields(resource.builtin()).to_vec();
        if let Some(custom) = resource.custom {
            supported = vec!["metadata.name", "metadata.namespace"];
            supported.extend(custom.selectable.iter().map(String::as_str));
        }
        if let Some(field) = fields.fields().find(|f| !supported.contains(f)) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {field} (for {}: {})",
                resource.plural,
                supported.join(", ")
            )));
        }
        Ok(Filters { plural: resource.builtin(), labels, fields })
    }

    /// Whether the request selects nothing out (no label or field selector).
    pub(crate) fn select_all(&self) -> bool {
        self.labels.is_empty() && self.fields.fields().next().is_none()
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        crate::selector::matches_object(&self.labels, object) && self.fields.matches(self.plural, object)
    }
}
