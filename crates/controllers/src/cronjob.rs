//! The CronJob controller's decision: when the schedule says so, a Job from the template
//! (named after the scheduled minute, so a restart never runs one twice), within the
//! concurrency policy and the starting deadline; finished Jobs beyond the history limits go.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::cron::Schedule;
use crate::job::finished;

/// The annotation on a Job that tells which scheduled time it is for.
pub const SCHEDULED: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// A Job to create: its name and scheduled time.
    pub create: Option<(String, Timestamp)>,
    /// Jobs (names) to delete: replaced ones and history beyond the limits.
    pub delete: Vec<String>,
    pub status: CronJobStatus,
    /// When the schedule next fires.
    pub wake: Option<Timestamp>,
    /// Why nothing can be scheduled (a bad schedule or time zone).
    pub error: Option<String>,
}

/// The Job name for a scheduled time (upstream: the name and the minutes since the epoch).
pub fn job_name(cronjob: &str, at: Timestamp) -> String {
    format!("{cronjob}-{}", at.as_second().div_euclid(60))
}

/// Plans for `cronjob`, given the Jobs it owns.
pub fn plan(cronjob: &CronJob, jobs: &[&Job], now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let spec = cronjob.spec.clone().unwrap_or_default();
    let name = cronjob.metadata.name.clone().unwrap_or_default();
    let mut status = cronjob.status.clone().unwrap_or_default();
    let job_name_of = |j: &Job| j.metadata.name.clone().unwrap_or_default();

    // History and the active list.
    let mut active: Vec<&Job> = Vec::new();
    let (mut succeeded, mut failed) = (Vec::new(), Vec::new());
    for job in jobs {
        if job.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match finished(job) {
            Some(("Complete", at)) => {
                let at = job.status.as_ref().and_then(|s| s.completion_time.as_ref()).map(|t| t.0).or(at);
                if at.is_some_and(|at| status.last_successful_time.as_ref().is_none_or(|t| t.0 < at)) {
                    status.last_successful_time = at.map(Time);
                }
                succeeded.push(*job);
            }
            Some(_) => failed.push(*job),
            None => active.push(job),
        }
    }
    let started = |j: &&Job| (j.metadata.creation_timestamp.as_ref().map(|t| t.0), j.metadata.name.clone());
    for (list, limit) in [
        (&mut succeeded, spec.successful_jobs_history_limit.unwrap_or(3)),
        (&mut failed, spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        list.sort_by_key(started);
        let excess = list.len().saturating_sub(limit.max(0) as usize);
        plan.delete.extend(list.iter().take(excess).map(|j| job_name_of(j)));
    }

    let zone = match spec.time_zone.as_deref() {
        None | Some("") => Ok(TimeZone::system()),
        Some(zone) => TimeZone::get(zone).map_err(|e| format!("unknown time zone {zone:?}: {e}")),
    };
    let schedule =
        spec.schedule.parse::<Schedule>().map_err(|e| format!("unparseable schedule {:?}: {e}", spec.schedule));
    let (schedule, zone) = match (schedule, zone) {
        (Ok(s), Ok(z)) => (s, z),
        (Err(e), _) | (_, Err(e)) => {
            plan.error = Some(e);
            plan.status = with_active(status, &active);
            return plan;
        }
    };
    plan.wake = schedule.next(now, &zone);
    let since =
        status.last_schedule_time.as_ref().or(cronjob.metadata.creation_timestamp.as_ref()).map(|t| t.0).unwrap_or(now);
    if spec.suspend != Some(true)
        && let Some(at) = schedule.latest(since, now, &zone)
    {
        let too_late = spec.starting_deadline_seconds.is_some_and(|d| now.as_second() - at.as_second() > d);
        let name = job_name(&name, at);
        if jobs.iter().any(|j| j.metadata.name.as_deref() == Some(name.as_str())) {
            status.last_schedule_time = Some(Time(at));
        } else if !too_late {
            match spec.concurrency_policy.as_deref() {
                Some("Forbid") if !active.is_empty() => {}
                policy => {
                    if policy == Some("Replace") {
                        plan.delete.extend(active.iter().map(|j| job_name_of(j)));
                        active.clear();
                    }
                    plan.create = Some((name, at));
                    status.last_schedule_time = Some(Time(at));
                }
            }
        }
    }
    plan.status = with_active(status, &active);
    plan
}

fn with_active(mut status: CronJobStatus, active: &[&Job]) -> CronJobStatus {
    let mut references: Vec<ObjectReference> = active
        .iter()
        .map(|j| ObjectReference {
            api_version: Some("batch/v1".into()),
            kind: Some("Job".into()),
            name: j.metadata.name.clone(),
            namespace: j.metadata.namespace.clone(),
            uid: j.metadata.uid.clone(),
            resource_version: j.metadata.resource_version.clone(),
            ..Default::default()
        })
        .collect();
    references.sort_by(|a, b| a.name.cmp(&b.name));
    status.active = Some(references).filter(|r| !r.is_empty());
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cronjob(spec: serde_json::Value, last: Option<&str>) -> CronJob {
        serde_json::from_value(json!({
            "metadata": {"name": "tick", "namespace": "default", "uid": "cj", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec, "status": {"lastScheduleTime": last}}))
        .unwrap()
    }

    fn job(name: &str, state: Option<&str>, created: &str) -> Job {
        let conditions = state.map(|s| json!([{"type": s, "status": "True", "lastTransitionTime": created}]));
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "default", "uid": name, "creationTimestamp": created},
                                      "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    fn spec(extra: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"schedule": "*/5 * * * *", "timeZone": "Etc/UTC", "jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_job_per_scheduled_time_named_after_it() {
        let now = ts("2026-01-01T00:07:00Z");
        let plan1 = plan(&cronjob(spec(json!({})), None), &[], now);
        let (name, at) = plan1.create.clone().unwrap();
        assert_eq!(at, ts("2026-01-01T00:05:00Z"));
        assert_eq!(name, job_name("tick", at));
        assert_eq!(plan1.status.last_schedule_time, Some(Time(at)));
        assert_eq!(plan1.wake, Some(ts("2026-01-01T00:10:00Z")));
        let made = job(&name, None, "2026-01-01T00:05:01Z");
        let plan2 = plan(&cronjob(spec(json!({})), Some("2026-01-01T00:05:00Z")), &[&made], now);
        assert_eq!(plan2.create, None, "already ran");
        assert_eq!(plan2.status.active.as_ref().map(Vec::len), Some(1));
        assert_eq!(plan(&cronjob(spec(json!({"suspend": true})), None), &[], now).create, None);
        let late = plan(&cronjob(spec(json!({"startingDeadlineSeconds": 60})), None), &[], now);
        assert_eq!(late.create, None, "two minutes late, one allowed");
    }

    #[test]
    fn concurrency_policies_and_history_limits() {
        let now = ts("2026-01-01T00:10:30Z");
        let running = job("tick-old", None, "2026-01-01T00:05:00Z");
        let forbid = plan(
            &cronjob(spec(json!({"concurrencyPolicy": "Forbid"})), Some("2026-01-01T00:05:00Z")),
            &[&running],
            now,
        );
        assert_eq!(forbid.create, None);
        let replace = plan(
            &cronjob(spec(json!({"concurrencyPolicy": "Replace"})), Some("2026-01-01T00:05:00Z")),
            &[&running],
            now,
        );
        assert!(replace.create.is_some());
        assert_eq!(replace.delete, ["tick-old"]);
        let history: Vec<Job> = (0..5)
            .map(|i| job(&format!("ok-{i}"), Some("Complete"), &format!("2026-01-01T00:0{i}:00Z")))
            .chain((0..3).map(|i| job(&format!("bad-{i}"), Some("Failed"), &format!("2026-01-01T00:0{i}:30Z"))))
            .collect();
        let refs: Vec<&Job> = history.iter().collect();
        let trimmed = plan(&cronjob(spec(json!({})), Some("2026-01-01T00:10:00Z")), &refs, now);
        assert_eq!(trimmed.delete, ["ok-0", "ok-1", "bad-0", "bad-1"]);
        assert_eq!(trimmed.status.last_successful_time, Some(Time(ts("2026-01-01T00:04:00Z"))));
    }

    #[test]
    fn bad_schedules_and_zones_are_reported() {
        let now = ts("2026-01-01T00:07:00Z");
        assert!(
            plan(&cronjob(spec(json!({"schedule": "every minute"})), None), &[], now)
                .error
                .unwrap()
                .contains("schedule")
        );
        assert!(
            plan(&cronjob(spec(json!({"timeZone": "Mars/Olympus"})), None), &[], now)
                .error
                .unwrap()
                .contains("time zone")
        );
    }
}
