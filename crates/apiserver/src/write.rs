//! Writes: create, update, patch (JSON, merge, strategic merge, server-side apply), delete and
//! delete a collection, and the read-modify-write every writer inside the server uses
//! ([`modify`], [`delete_one`], [`put_system_object`]). Each write runs its kind's defaults and
//! validation, the built-in admission plugins, admission webhooks and policies, quota, and
//! keeps managedFields; what is particular to a kind is its strategy's (`strategy.rs`).

use axum::body::Body;
use axum::http::{Response, StatusCode};
use serde_json::{Value, json};
use tugboat_store::{ListOptions, StoreError};

use crate::admission;
use crate::fields;
use crate::object::{self, decode_body};
use crate::registry::{self, Resource};
use crate::request::{Filters, Query, Write};
use crate::state::{ApiState, json_response, read_object};
use crate::status::ApiError;
use crate::strategy::DeleteWaits;
pub(crate) use crate::strategy::View;

const UPDATE_RETRIES: usize = 5;

/// Checks the namespace a namespaced request names: it must exist and not be terminating.
pub(crate) async fn check_namespace(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    creating: bool,
) -> Result<(), ApiError> {
    if !resource.namespaced {
        return Ok(());
    }
    let Some(namespace) = namespace else {
        return Err(ApiError::bad_request("a namespace is required"));
    };
    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
    let key = namespaces.key(None, namespace);
    let store_error = |e| ApiError::from_store(e, "", "namespaces", namespace);
    // From the watch cache (as upstream's NamespaceLifecycle reads its informer); a namespace
    // it does not have yet may be a moment old: the store says.
    let cached = state.caches.get(&namespaces.prefix(None)).await.map_err(store_error)?.object(&key);
    let object = match cached {
        Some(object) => object,
        None => match state.store.get(&key, None).await.map_err(store_error)? {
            Some(found) => object::from_store(namespaces, &found.value, found.mod_revision)?,
            None => return Err(ApiError::not_found("", "namespaces", namespace)),
        },
    };
    if creating {
        if object["status"]["phase"] == "Terminating" {
            let mut error = ApiError::bad_request(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                resource.plural, ""
            ));
            error.code = 403;
            error.reason = "Forbidden";
            return Err(error);
        }
    }
    Ok(())
}

pub(crate) async fn create(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let object = decode_body(content_type, body)?;
    write.note_duplicates(content_type, body);
    create_object(state, resource, namespace, object, write, None).await
}

/// Creates `object`; `applied` is the field set of a server-side apply that creates it.
pub(crate) async fn create_object(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    mut object: Value,
    write: &Write,
    applied: Option<fields::FieldSet>,
) -> Result<Response<Body>, ApiError> {
    write.check_fields(resource, &mut object)?;
    object::prepare_create(resource, namespace, &mut object)?;
    match applied {
        Some(set) => fields::write_managed(
            &mut object,
            &[fields::Managed {
                manager: write.manager.clone(),
                operation: "Apply".into(),
                api_version: resource.api_version(),
                subresource: String::new(),
                fields: set,
            }],
        ),
        None => fields::record_update(&write.manager, &resource.api_version(), "", None, &mut object),
    }
    object::validate(resource, &object)?;
    let strategy = resource.strategy();
    strategy.validate_create(state, resource, &mut object)?;
    let namespace =
        if resource.namespaced { object["metadata"]["namespace"].as_str().map(str::to_string) } else { None };
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    check_namespace(state, resource, namespace.as_deref(), true).await?;
    strategy.admit_create(state, &mut object).await?;
    if write.admit {
        let attributes = crate::matching::Attributes {
            resource,
            subresource: "",
            operation: crate::matching::Operation::Create,
            namespace: namespace.as_deref(),
            name: &name,
            old: None,
            options: write.options("CreateOptions"),
            dry_run: write.dry_run,
            user: write.user.as_ref(),
        };
        if admission::mutate(state, &attributes, &mut object, write).await? {
            after_mutation(state, resource, &mut object, None)?;
        }
        admission::validate(state, &attributes, Some(&object), write).await?;
    }
    crate::quota::admit(state, resource, &object, None, write.dry_run).await?;
    if write.dry_run {
        return Ok(json_response(StatusCode::CREATED, &object));
    }
    let allocated = strategy.allocate(state, &mut object).await?;
    let key = resource.key(namespace.as_deref(), &name);
    let stored = crate::conversion::stored(state.store.as_ref(), resource, &object).await?;
    let created = state.store.create(&key, stored).await;
    if created.is_err() && allocated {
        strategy.after_delete(state, &object).await;
    }
    let revision = created.map_err(|e| ApiError::from_store(e, resource.group, resource.plural, &name))?;
    object["metadata"]["resourceVersion"] = json!(revision.to_string());
    strategy.after_write(state, revision).await;
    Ok(json_response(StatusCode::CREATED, &object))
}

/// After a mutating webhook changed an object: what its kind does not declare is dropped, its
/// defaults are applied again (to what the webhook added) and it is validated again.
fn after_mutation(
    state: &ApiState,
    resource: &Resource,
    object: &mut Value,
    update: Option<(View, &Value)>,
) -> Result<(), ApiError> {
    match resource.custom {
        Some(custom) => {
            crate::custom::prune(custom, object);
        }
        None => {
            crate::schema::schemas().prune_unknown(resource, object);
        }
    }
    object::apply_defaults(resource, object);
    object::validate(resource, object)?;
    match update {
        None => resource.strategy().validate_create(state, resource, object),
        Some((view, old)) => resource.strategy().validate_update(state, resource, view, old, object),
    }
}

/// Server-side apply (`PATCH application/apply-patch+yaml`): the applied configuration becomes
/// the fields its manager owns. A field another manager owns with a different value is a
/// conflict (409) unless `force=true`, which takes it over; fields the manager applied before
/// and no longer applies are removed unless someone else owns them; a missing object is created.
/// A server-side apply to an object (`View::Main`) or its status (`View::Status`: what is
/// applied outside the status, labels and annotations is not the status writer's to own).
pub(crate) async fn server_side_apply(
    state: &ApiState,
    target: (&Resource, Option<&str>, &str),
    view: View,
    query: &Query,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let (resource, namespace, name) = target;
    let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::bad_request("fieldManager is required for apply requests"));
    };
    let force = query.get("force").is_some_and(|f| f == "true");
    let mut applied = decode_body("application/yaml", body)?;
    write.check_applied_fields(resource, &mut applied, namespace, name)?;
    if applied["apiVersion"].as_str().is_none_or(str::is_empty) || applied["kind"].as_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request("an applied configuration needs apiVersion and kind"));
    }
    if let Some(given) = applied["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let mut applied_set = fields::field_set(&applied);
    let subresource = if view == View::Status { "status" } else { "" };
    // What the write cannot change is not the applier's to own (upstream's reset fields): the
    // status of a resource with a status subresource, or on /status all but it, labels and
    // annotations.
    let field =
        |path: &fields::Path, i: usize, name: &str| matches!(path.get(i), Some(fields::Step::Field(f)) if f == name);
    match view {
        View::Status => applied_set.retain(|path| {
            field(path, 0, "status")
                || (field(path, 0, "metadata") && (field(path, 1, "labels") || field(path, 1, "annotations")))
        }),
        _ if resource.has_status() => applied_set.retain(|path| !field(path, 0, "status")),
        _ => {}
    }
    let write = Write { manager: manager.clone(), apply: true, ..write.clone() };
    let api_version = resource.api_version();
    // Apply to the object as it is; a missing object is created from the applied configuration.
    let merge = |current: &Value, _: i64| {
        let mut managed = fields::read_managed(current);
        let mine =
            |m: &fields::Managed| m.manager == *manager && m.operation == "Apply" && m.subresource == subresource;
        let mut conflicts = Vec::new();
        for entry in managed.iter().filter(|m| !mine(m)) {
            for path in entry.fields.intersection(&applied_set) {
                // A list element's own entry (`k:{"name":"web"}`) is its existence, not a
                // value: owners of the same element share it; their leaves may conflict.
                let element = matches!(path.last(), Some(fields::Step::Key(_)));
                if !element && fields::get(current, path) != fields::get(&applied, path) {
                    conflicts.push((entry.manager.clone(), entry.api_version.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(apply_conflict(resource, name, &conflicts));
        }
        for (owner, _, path) in &conflicts {
            for entry in managed.iter_mut().filter(|m| m.manager == *owner) {
                entry.fields.remove(path);
            }
        }
        let previous = managed.iter().find(|m| mine(m)).map(|m| m.fields.clone()).unwrap_or_default();
        let mut merged = current.clone();
        for path in previous.difference(&applied_set) {
            let owned_by_others = managed.iter().any(|m| !mine(m) && m.fields.contains(path));
            if !owned_by_others {
                fields::remove(&mut merged, path);
            }
        }
        let mut merged = crate::smp::apply(&merged, &applied).map_err(|e| patch_error("applied configuration", e))?;
        managed.retain(|m| !mine(m));
        managed.push(fields::Managed {
            manager: manager.clone(),
            operation: "Apply".into(),
            api_version: api_version.clone(),
            subresource: subresource.into(),
            fields: applied_set.clone(),
        });
        fields::write_managed(&mut merged, &managed);
        Ok(merged)
    };
    loop {
        match modify(state, (resource, namespace, name), view, &write, merge).await {
            Err(error) if error.code == 404 && error.reason == "NotFound" && view == View::Main => {
                let mut object = applied.clone();
                object["metadata"]["name"] = json!(name);
                match create_object(state, resource, namespace, object, &write, Some(applied_set.clone())).await {
                    // Created meanwhile by someone else: apply to that.
                    Err(error) if error.reason == "AlreadyExists" => continue,
                    other => return other,
                }
            }
            other => return other,
        }
    }
}

/// 409 as upstream words it: `Apply failed with 1 conflict: conflict with "kubectl-scale" using apps/v1: .spec.replicas`.
fn apply_conflict(resource: &Resource, name: &str, conflicts: &[(String, String, fields::Path)]) -> ApiError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(manager, version, path)| {
            format!("conflict with \"{manager}\" using {version}: {}", fields::display(path))
        })
        .collect();
    let count = conflicts.len();
    let plural = if count == 1 { "" } else { "s" };
    let mut error = ApiError::conflict(resource.group, resource.plural, name);
    error.message = if count == 1 {
        format!("Apply failed with 1 conflict: {}", lines[0])
    } else {
        format!("Apply failed with {count} conflict{plural}: {}", lines.join("\n"))
    };
    error.causes = conflicts
        .iter()
        .zip(&lines)
        .map(|((_, _, path), line)| crate::status::Cause {
            reason: "FieldManagerConflict",
            message: line.clone(),
            field: fields::display(path),
        })
        .collect();
    error
}

/// The read-modify-write loop every update and patch goes through: read the object, let
/// `change` produce the new view from the current one, merge it back, validate, and write if
/// the object did not change meanwhile (else read again). A `change` that fails (a stale
/// resourceVersion named by the client, a patch that does not apply) ends the loop.
pub(crate) async fn modify(
    state: &ApiState,
    target: (&Resource, Option<&str>, &str),
    view: View,
    write: &Write,
    change: impl Fn(&Value, i64) -> Result<Value, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let (resource, namespace, name) = target;
    for _ in 0..UPDATE_RETRIES {
        let (old, revision) = read_object(state, resource, namespace, name).await?;
        let mut written = change(&view.project(resource, &old), revision)?;
        if !written.is_object() {
            return Err(ApiError::bad_request("the request does not leave an object"));
        }
        // The server's own writes (View::Whole) change an object it stored: nothing to prune.
        if !matches!(view, View::Scale | View::Whole) {
            write.check_fields(resource, &mut written)?;
        }
        // A server-side apply's managedFields are its own, whatever part of the object it wrote.
        let applied_managed = write.apply.then(|| written["metadata"]["managedFields"].clone());
        let mut object = view.merge_back(resource, &old, written)?;
        if let Some(managed) = applied_managed
            && let Some(metadata) = object["metadata"].as_object_mut()
        {
            match managed {
                Value::Null => metadata.remove("managedFields"),
                managed => metadata.insert("managedFields".into(), managed),
            };
        }
        object["metadata"]["name"] = json!(name);
        object::prepare_update(resource, &old, &mut object)?;
        let subresource = match view {
            View::Main | View::Whole => "",
            View::Status => "status",
            View::Ephemeral => "ephemeralcontainers",
            View::Scale => "scale",
            View::Finalize => "finalize",
        };
        // A server-side apply has written its own managedFields; every other write is an
        // Update, except the server's own (a binding, as upstream, records no manager).
        if !write.apply && view != View::Whole {
            fields::record_update(&write.manager, &resource.api_version(), subresource, Some(&old), &mut object);
        }
        object::validate(resource, &object)?;
        let strategy = resource.strategy();
        strategy.validate_update(state, resource, view, &old, &mut object)?;
        if view == View::Main && !write.dry_run {
            strategy.allocate_update(state, &old, &mut object).await?;
        }
        if write.admit && view != View::Whole {
            let attributes = crate::matching::Attributes {
                resource,
                subresource,
                operation: crate::matching::Operation::Update,
                namespace,
                name,
                old: Some(&old),
                options: write.options("UpdateOptions"),
                dry_run: write.dry_run,
                user: write.user.as_ref(),
            };
            if matches!(view, View::Main | View::Status) {
                if admission::mutate(state, &attributes, &mut object, write).await? {
                    after_mutation(state, resource, &mut object, Some((view, &old)))?;
                }
                admission::validate(state, &attributes, Some(&object), write).await?;
            } else {
                // A subresource's own object (a Scale) is what is reviewed.
                let (old, new) = (view.project(resource, &old), view.project(resource, &object));
                let attributes = crate::matching::Attributes { old: Some(&old), ..attributes };
                admission::validate(state, &attributes, Some(&new), write).await?;
            }
        }
        if view == View::Main && strategy.quota_on_update() {
            crate::quota::admit(state, resource, &object, Some(&old), write.dry_run).await?;
        }
        if write.dry_run {
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            return Ok(json_response(StatusCode::OK, &view.project(resource, &object)));
        }
        let key = resource.key(namespace, name);
        // An object being deleted goes once its last finalizer is removed (a pod only once its
        // kubelet has finished it: it deletes with a zero grace period).
        let finalized = object["metadata"]["deletionTimestamp"].is_string()
            && object["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && object["spec"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && object["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) == 0;
        if finalized {
            return match state.store.delete(&key, Some(revision)).await {
                Ok((deleted, _)) => {
                    strategy.after_write(state, deleted).await;
                    Ok(json_response(StatusCode::OK, &view.project(resource, &object)))
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => Err(ApiError::from_store(error, resource.group, resource.plural, name)),
            };
        }
        let stored = crate::conversion::stored(state.store.as_ref(), resource, &object).await?;
        match state.store.update(&key, stored, revision).await {
            Ok(new_revision) => {
                object["metadata"]["resourceVersion"] = json!(new_revision.to_string());
                strategy.after_write(state, new_revision).await;
                return Ok(json_response(StatusCode::OK, &view.project(resource, &object)));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => {
                return Err(ApiError::from_store(error, resource.group, resource.plural, name));
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, name))
}

/// A client that names a resourceVersion must name the current one.
fn check_precondition(given: Option<&str>, revision: i64, resource: &Resource, name: &str) -> Result<(), ApiError> {
    match given.filter(|g| !g.is_empty()) {
        Some(given) if given != revision.to_string() => Err(ApiError::conflict(resource.group, resource.plural, name)),
        _ => Ok(()),
    }
}

pub(crate) async fn update(
    state: &ApiState,
    (resource, namespace, name): (&Resource, Option<&str>, &str),
    view: View,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let object = decode_body(content_type, body)?;
    write.note_duplicates(content_type, body);
    if let Some(given) = object["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    modify(state, (resource, namespace, name), view, write, |_, revision| {
        check_precondition(object["metadata"]["resourceVersion"].as_str(), revision, resource, name)?;
        Ok(object.clone())
    })
    .await
}

fn patch_error(kind: &str, error: impl std::fmt::Display) -> ApiError {
    let mut error = ApiError::bad_request(format!("the {kind} cannot be applied: {error}"));
    error.code = 422;
    error.reason = "Invalid";
    error
}

/// Applies a patch document of the given media type to `current`.
fn apply_patch(media: &str, current: &Value, patch: &Value) -> Result<Value, ApiError> {
    let mut patched = current.clone();
    match media {
        "application/merge-patch+json" => json_patch::merge(&mut patched, patch),
        "application/json-patch+json" => {
            let operations: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
            object::json_patch(&mut patched, &operations).map_err(|e| patch_error("JSON patch", e))?;
        }
        "application/strategic-merge-patch+json" => {
            patched = crate::smp::apply(current, patch).map_err(|e| patch_error("strategic merge patch", e))?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    Ok(patched)
}

pub(crate) async fn patch(
    state: &ApiState,
    (resource, namespace, name): (&Resource, Option<&str>, &str),
    view: View,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim().to_string();
    if !matches!(
        media.as_str(),
        "application/merge-patch+json" | "application/json-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::unsupported_media_type(&media));
    }
    if resource.custom.is_some() && media == "application/strategic-merge-patch+json" {
        // Custom objects have no patch strategies: upstream refuses such patches.
        let mut error = ApiError::unsupported_media_type(&media);
        error.message = "the body of the request was in an unknown format - accepted media types include: \
                         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
            .into();
        return Err(error);
    }
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    modify(state, (resource, namespace, name), view, write, |current, revision| {
        if media != "application/json-patch+json" {
            check_precondition(patch["metadata"]["resourceVersion"].as_str(), revision, resource, name)?;
        }
        apply_patch(&media, current, &patch)
    })
    .await
}

/// Upstream's finalizers for the propagation policies the garbage collector acts on.
const FOREGROUND: &str = "foregroundDeletion";

const ORPHAN: &str = "orphan";

/// The DeleteOptions of a DELETE: none, JSON, or protobuf (client-go's typed clients send
/// their options in the content type they were made for).
/// A DELETE's options: from its query (`?gracePeriodSeconds=30&propagationPolicy=Foreground`,
/// as a REST client may send them), then from its body, whose fields win, as upstream reads them.
fn delete_options(query: &Query, content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let mut options = json!({});
    for (name, value) in query {
        match name.as_str() {
            "gracePeriodSeconds" => {
                let seconds = value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("gracePeriodSeconds: invalid value {value:?}: not an integer"))
                })?;
                options[name] = json!(seconds);
            }
            "orphanDependents" | "ignoreStoreReadErrorWithClusterBreakingPotential" => {
                let flag = value.parse::<bool>().map_err(|_| {
                    ApiError::bad_request(format!("{name}: invalid value {value:?}: not true or false"))
                })?;
                options[name] = json!(flag);
            }
            "propagationPolicy" => options[name] = json!(value),
            _ => {}
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(options);
    }
    let protobuf = body.starts_with(b"k8s\0") || content_type.starts_with("application/vnd.kubernetes.protobuf");
    let from_body =
        decode_body(if protobuf { "application/vnd.kubernetes.protobuf" } else { "application/json" }, body)?;
    if let (Some(options), Some(fields)) = (options.as_object_mut(), from_body.as_object()) {
        options.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(options)
}

pub(crate) async fn delete(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    query: &Query,
    (content_type, body): (&str, &[u8]),
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let options = delete_options(query, content_type, body)?;
    let (code, object) = delete_one(state, resource, namespace, name, &options, write).await?;
    Ok(json_response(code, &object))
}

/// Deletes one object as upstream does: with finalizers (the object's own, or those the
/// propagation policy asks for) it is only marked with a deletionTimestamp; a pod bound to a
/// node is marked for graceful termination (its kubelet finishes the deletion); anything else is
/// removed at once. Returns the status code and the object as it is after the request.
pub(crate) async fn delete_one(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    options: &Value,
    write: &Write,
) -> Result<(StatusCode, Value), ApiError> {
    let dry_run = write.dry_run;
    let strategy = resource.strategy();
    strategy.check_delete(name)?;
    for _ in 0..UPDATE_RETRIES {
        let (mut object, revision) = read_object(state, resource, namespace, name).await?;
        let preconditions = &options["preconditions"];
        if preconditions["uid"].as_str().is_some_and(|uid| object["metadata"]["uid"].as_str() != Some(uid))
            || preconditions["resourceVersion"].as_str().is_some_and(|rv| rv != revision.to_string())
        {
            return Err(ApiError::conflict(resource.group, resource.plural, name));
        }
        if write.admit {
            let mut delete_options = options.clone();
            if let Some(map) = delete_options.as_object_mut() {
                map.insert("kind".into(), json!("DeleteOptions"));
                map.insert("apiVersion".into(), json!("meta.k8s.io/v1"));
            }
            let attributes = crate::matching::Attributes {
                resource,
                subresource: "",
                operation: crate::matching::Operation::Delete,
                namespace,
                name,
                old: Some(&object),
                options: delete_options,
                dry_run,
                user: write.user.as_ref(),
            };
            admission::mutate(state, &attributes, &mut Value::Null, write).await?;
            admission::validate(state, &attributes, None, write).await?;
        }
        let grace = options["gracePeriodSeconds"].as_i64();
        let mut finalizers: Vec<Value> = object["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        let mut add = |f: &str| {
            if !finalizers.iter().any(|v| v == f) {
                finalizers.push(json!(f));
            }
        };
        // The deprecated `orphanDependents` stands for a policy when none is given.
        let policy = options["propagationPolicy"].as_str().or(match options["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan"),
            Some(false) => Some("Background"),
            None => None,
        });
        match policy {
            Some("Foreground") => add(FOREGROUND),
            Some("Orphan") => add(ORPHAN),
            Some("Background") | None => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy {other:?} is not one of Orphan, Background, Foreground"
                )));
            }
        }
        let waits = strategy.delete_waits(&object, grace);
        let graceful_pod = matches!(waits, DeleteWaits::Grace(_));
        let key = resource.key(namespace, name);
        if !finalizers.is_empty() || waits != DeleteWaits::Nothing {
            if object["metadata"]["deletionTimestamp"].is_string() && !graceful_pod {
                return Ok((StatusCode::OK, object));
            }
            let now = object::now_rfc3339();
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(now);
            }
            let grace_seconds = match waits {
                DeleteWaits::Grace(seconds) => seconds,
                _ => 0,
            };
            object["metadata"]["deletionGracePeriodSeconds"] = json!(grace_seconds);
            object["metadata"]["finalizers"] = Value::Array(finalizers);
            strategy.deleting(&mut object);
            if dry_run {
                return Ok((StatusCode::OK, object));
            }
            match state.store.update(&key, object::to_store(resource, &object), revision).await {
                Ok(new_revision) => {
                    object["metadata"]["resourceVersion"] = json!(new_revision.to_string());
                    return Ok((StatusCode::OK, object));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => {
                    return Err(ApiError::from_store(error, resource.group, resource.plural, name));
                }
            }
        }
        if dry_run {
            return Ok((StatusCode::OK, object));
        }
        match state.store.delete(&key, Some(revision)).await {
            Ok(_) => {
                strategy.after_delete(state, &object).await;
                return Ok((StatusCode::OK, object));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => {
                return Err(ApiError::from_store(error, resource.group, resource.plural, name));
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, name))
}

/// `DELETE` on a collection: every object the selectors match, each as a single delete would.
pub(crate) async fn delete_collection(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    query: &Query,
    (content_type, body): (&str, &[u8]),
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let options = delete_options(query, content_type, body)?;
    let filters = Filters::from_query(resource, query)?;
    let page = state
        .store
        .list(&resource.prefix(namespace), ListOptions::default())
        .await
        .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, ""))?;
    let mut stored = Vec::with_capacity(page.kvs.len());
    for kv in &page.kvs {
        stored.push(object::from_store(resource, &kv.value, kv.mod_revision)?);
    }
    // Selected by the fields of the version asked for.
    let objects = crate::conversion::convert(state.store.as_ref(), resource, stored).await?;
    let mut deleted = Vec::new();
    for object in objects {
        if !filters.matches(&object) {
            continue;
        }
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let object_namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        match delete_one(state, resource, object_namespace.as_deref(), &name, &options, write).await {
            Ok((_, object)) => deleted.push(object),
            Err(error) if error.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    let list = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": page.revision.to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// Creates `desired`, or replaces the stored object's `fields` with its own if they differ.
pub(crate) async fn put_system_object(
    state: &ApiState,
    resource: &Resource,
    mut desired: Value,
    fields: &[&str],
) -> Result<(), ApiError> {
    let namespace = desired["metadata"]["namespace"].as_str().map(str::to_string);
    let name = desired["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let key = resource.key(namespace.as_deref(), &name);
    let failed = |error| ApiError::from_store(error, resource.group, resource.plural, &name);
    for _ in 0..UPDATE_RETRIES {
        match state.store.get(&key, None).await.map_err(failed)? {
            None => {
                object::prepare_create(resource, namespace.as_deref(), &mut desired)?;
                match state.store.create(&key, object::to_store(resource, &desired)).await {
                    Ok(_) => return Ok(()),
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(error) => return Err(failed(error)),
                }
            }
            Some(stored) => {
                let old = object::from_store(resource, &stored.value, stored.mod_revision)?;
                if fields.iter().all(|f| old[*f] == desired[*f]) {
                    return Ok(());
                }
                let mut object = old.clone();
                for field in fields {
                    object[*field] = desired[*field].clone();
                }
                object::prepare_update(resource, &old, &mut object)?;
                match state.store.update(&key, object::to_store(resource, &object), stored.mod_revision).await {
                    Ok(_) => return Ok(()),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(error) => return Err(failed(error)),
                }
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, &name))
}
