//! The Job controller's decision: how many pods to start (parallelism, completions, retries
//! with backoff after failures), which to stop, and when the Job is done — Complete when enough
//! pods succeeded, Failed past `backoffLimit` or `activeDeadlineSeconds` — and when a finished
//! Job's `ttlSecondsAfterFinished` deletes it.

use std::cmp::Reverse;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::pods::{is_active, is_ready};

/// What to do for one Job.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create.
    pub create: usize,
    /// For an Indexed Job, the completion index of each pod to create (`create` of them).
    pub indexes: Vec<i32>,
    /// Active pods (names) to delete.
    pub delete: Vec<String>,
    pub status: JobStatus,
    /// The Job's TTL after finishing has run out: delete it.
    pub delete_job: bool,
    /// When to look again without any change (a backoff, a deadline or a TTL ends).
    pub wake: Option<Timestamp>,
}

/// The annotation (and label) with an Indexed Job's pod's completion index.
pub const INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// A pod's completion index, if it has one.
pub fn index_of(pod: &Pod) -> Option<i32> {
    pod.metadata.annotations.as_ref()?.get(INDEX)?.parse().ok().filter(|i: &i32| *i >= 0)
}

/// `completedIndexes` as upstream writes it: sorted, runs joined (`0-3,5`).
fn compact(indexes: &std::collections::BTreeSet<i32>) -> String {
    let mut runs: Vec<(i32, i32)> = Vec::new();
    for &i in indexes {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    runs.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect::<Vec<_>>().join(",")
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// When a finished pod finished: its last container's end, or its last condition change.
fn finished_at(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref()?;
    let ends = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref().map(|t| t.0));
    let changes = status.conditions.iter().flatten().filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0));
    ends.chain(changes).max()
}

/// Whether a Job has finished (a Complete or Failed condition holds), and when.
pub fn finished(job: &Job) -> Option<(&'static str, Option<Timestamp>)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find_map(|c| {
        let kind = match c.type_.as_str() {
            "Complete" => "Complete",
            "Failed" => "Failed",
            _ => return None,
        };
        (c.status == "True").then(|| (kind, c.last_transition_time.as_ref().map(|t| t.0)))
    })
}

fn condition(kind: &str, reason: &str, message: &str, now: Timestamp) -> JobCondition {
    JobCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// What `policy` says of a failed pod: the action of the first rule it matches (`FailJob`,
/// `Ignore`, `Count`, `FailIndex`) and, for FailJob, upstream's message; `None` when no rule
/// matches (the failure counts).
fn judge<'a>(policy: &'a k8s_openapi::api::batch::v1::PodFailurePolicy, pod: &Pod) -> Option<(&'a str, String)> {
    let pod_name = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let status = pod.status.as_ref();
    for (index, rule) in policy.rules.iter().enumerate() {
        if let Some(codes) = &rule.on_exit_codes {
            let statuses = status
                .into_iter()
                .flat_map(|s| s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten()));
            for container in statuses {
                if codes.container_name.as_ref().is_some_and(|n| *n != container.name) {
                    continue;
                }
                let Some(code) = container.state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code)
                else {
                    continue;
                };
                let listed = codes.values.contains(&code);
                let matched = match codes.operator.as_str() {
                    "In" => listed,
                    // A successful container never matches NotIn.
                    "NotIn" => !listed && code != 0,
                    _ => false,
                };
                if matched {
                    let message = format!(
                        "Container {} for pod {pod_name} failed with exit code {code} matching {} rule at index {index}",
                        container.name, rule.action
                    );
                    return Some((rule.action.as_str(), message));
                }
            }
        }
        for wanted in rule.on_pod_conditions.iter().flatten() {
            let holds = status.and_then(|s| s.conditions.as_ref()).is_some_and(|conditions| {
                conditions.iter().any(|c| c.type_ == wanted.type_ && c.status == wanted.status)
            });
            if holds {
                let message = format!(
                    "Pod {pod_name} has condition {} matching {} rule at index {index}",
                    wanted.type_, rule.action
                );
                return Some((rule.action.as_str(), message));
            }
        }
    }
    None
}

/// The delay before the next pod after `failures` failed ones (upstream: 10 s doubling, at
/// most 6 minutes).
pub fn backoff(failures: i32) -> SignedDuration {
    if failures <= 0 {
        return SignedDuration::ZERO;
    }
    let seconds = 10i64.saturating_mul(1 << (failures - 1).min(10));
    SignedDuration::from_secs(seconds.min(360))
}

/// Plans for `job`, given the pods it owns and how many it created that the pod watch has not
/// shown yet.
pub fn plan(job: &Job, pods: &[&Pod], in_flight: usize, now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let spec = job.spec.clone().unwrap_or_default();
    let mut status = job.status.clone().unwrap_or_default();
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    let mut active: Vec<&Pod> = pods.iter().copied().filter(|p| is_active(p)).collect();

    if let Some((_, at)) = finished(job) {
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            let end = status.completion_time.as_ref().map(|t| t.0).or(at).unwrap_or(now);
            let expiry = end + SignedDuration::from_secs(i64::from(ttl));
            if now >= expiry { plan.delete_job = true } else { plan.wake = Some(expiry) }
        }
        plan.delete = active.iter().map(|p| name(p)).collect();
        status.active = Some(0).filter(|_| status.active.is_some());
        status.ready = Some(0);
        plan.status = status;
        return plan;
    }

    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    // An Indexed Job counts each index once: done when every index has succeeded.
    let completed: std::collections::BTreeSet<i32> = pods
        .iter()
        .filter(|p| phase(p) == Some("Succeeded"))
        .filter_map(|p| index_of(p))
        .filter(|i| spec.completions.is_none_or(|c| *i < c))
        .collect();
    let succeeded = if indexed {
        completed.len() as i32
    } else {
        pods.iter().filter(|p| phase(p) == Some("Succeeded")).count() as i32
    };
    // The pod failure policy: the first rule a failed pod matches says whether its failure
    // counts, is ignored, or fails the Job at once.
    let judged: Vec<(&Pod, Option<(&str, String)>)> = pods
        .iter()
        .copied()
        .filter(|p| phase(p) == Some("Failed"))
        .map(|p| (p, spec.pod_failure_policy.as_ref().and_then(|policy| judge(policy, p))))
        .collect();
    let fail_job = judged.iter().find_map(|(_, verdict)| match verdict {
        Some(("FailJob", message)) => Some(message.clone()),
        _ => None,
    });
    let failed = judged.iter().filter(|(_, verdict)| !matches!(verdict, Some(("Ignore", _)))).count() as i32;
    let succeeded = succeeded.max(status.succeeded.unwrap_or(0));
    let failed = failed.max(status.failed.unwrap_or(0));
    let suspended = spec.suspend == Some(true);
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let mut conditions = status.conditions.take().unwrap_or_default();
    conditions.retain(|c| c.type_ != "Suspended" || suspended);
    if status.start_time.is_none() && !suspended {
        status.start_time = Some(Time(now));
    }
    let started = status.start_time.as_ref().map(|t| t.0);
    let deadline =
        spec.active_deadline_seconds.zip(started).map(|(seconds, start)| start + SignedDuration::from_secs(seconds));
    let complete = match spec.completions {
        Some(completions) => succeeded >= completions,
        None => succeeded > 0 && active.is_empty(),
    };

    let mut stop_all = false;
    if let Some(message) = fail_job {
        conditions.push(condition("FailureTarget", "PodFailurePolicy", &message, now));
        conditions.push(condition("Failed", "PodFailurePolicy", &message, now));
        stop_all = true;
    } else if failed > backoff_limit {
        let message = "Job has reached the specified backoff limit";
        conditions.push(condition("FailureTarget", "BackoffLimitExceeded", message, now));
        conditions.push(condition("Failed", "BackoffLimitExceeded", message, now));
        stop_all = true;
    } else if deadline.is_some_and(|d| now >= d) && !suspended {
        let message = "Job was active longer than specified deadline";
        conditions.push(condition("FailureTarget", "DeadlineExceeded", message, now));
        conditions.push(condition("Failed", "DeadlineExceeded", message, now));
        stop_all = true;
    } else if complete {
        let message = "Reached expected number of succeeded pods";
        conditions.push(condition("SuccessCriteriaMet", "CompletionsReached", message, now));
        conditions.push(condition("Complete", "CompletionsReached", message, now));
        status.completion_time = Some(Time(now));
        stop_all = true;
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            plan.wake = Some(now + SignedDuration::from_secs(i64::from(ttl)));
        }
    } else if suspended {
        if !conditions.iter().any(|c| c.type_ == "Suspended") {
            conditions.push(condition("Suspended", "JobSuspended", "Job suspended", now));
        }
        stop_all = true;
    } else {
        plan.wake = deadline;
        let wanted = match spec.completions {
            Some(completions) => parallelism.min(completions - succeeded).max(0),
            None if succeeded > 0 => 0,
            None => parallelism,
        } as usize;
        let have = active.len() + in_flight;
        if have < wanted {
            let last_failure = pods.iter().filter(|p| phase(p) == Some("Failed")).filter_map(|p| finished_at(p)).max();
            let ready_at = last_failure.map(|at| at + backoff(failed));
            match ready_at {
                Some(at) if at > now => plan.wake = Some(plan.wake.map_or(at, |w| w.min(at))),
                _ if indexed => {
                    // The lowest indexes neither done nor running (nor just made).
                    let running: std::collections::BTreeSet<i32> = active.iter().filter_map(|p| index_of(p)).collect();
                    plan.indexes = (0..spec.completions.unwrap_or(0))
                        .filter(|i| !completed.contains(i) && !running.contains(i))
                        .take(wanted.saturating_sub(active.len()).saturating_sub(in_flight))
                        .collect();
                    plan.create = plan.indexes.len();
                }
                _ => plan.create = wanted - have,
            }
        } else if active.len() > wanted {
            active.sort_by_key(|p| {
                let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
                (scheduled, is_ready(p), Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)))
            });
            plan.delete = active.iter().take(active.len() - wanted).map(|p| name(p)).collect();
        }
    }
    if stop_all {
        plan.delete = active.iter().map(|p| name(p)).collect();
    }
    let running = if stop_all { 0 } else { active.len() as i32 };
    status.active = Some(running).filter(|n| *n > 0 || status.active.is_some());
    status.ready = Some(if stop_all { 0 } else { active.iter().filter(|p| is_ready(p)).count() as i32 });
    status.succeeded = Some(succeeded).filter(|n| *n > 0 || status.succeeded.is_some());
    if indexed {
        status.completed_indexes = Some(compact(&completed)).filter(|c| !c.is_empty());
    }
    status.failed = Some(failed).filter(|n| *n > 0 || status.failed.is_some());
    status.conditions = Some(conditions).filter(|c| !c.is_empty());
    plan.status = status;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(spec: serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": "pi", "namespace": "default", "uid": "job-uid"}, "spec": spec}),
        )
        .unwrap()
    }

    fn pod(name: &str, phase: &str, finished: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [], "nodeName": "n1"},
            "status": {"phase": phase, "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": if phase == "Failed" { 1 } else { 0 }, "finishedAt": Some(finished).filter(|f| !f.is_empty())}}}]}}))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    fn has(plan: &Plan, kind: &str) -> bool {
        plan.status.conditions.iter().flatten().any(|c| c.type_ == kind && c.status == "True")
    }

    #[test]
    fn runs_parallelism_pods_until_completions_succeed() {
        let spec = json!({"completions": 5, "parallelism": 2, "template": {"spec": {"containers": []}}});
        let fresh = plan(&job(spec.clone()), &[], 0, now());
        assert_eq!(fresh.create, 2);
        assert_eq!(fresh.status.start_time, Some(Time(now())));
        let pods = [
            pod("a", "Succeeded", "2026-01-01T00:01:00Z"),
            pod("b", "Succeeded", "2026-01-01T00:01:00Z"),
            pod("c", "Succeeded", "2026-01-01T00:01:00Z"),
            pod("d", "Running", "2026-01-01T00:01:00Z"),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let midway = plan(&job(spec.clone()), &refs, 0, now());
        assert_eq!(midway.create, 1, "two more to succeed, one running");
        assert_eq!(midway.status.succeeded, Some(3));
        assert!(!has(&midway, "Complete"));
        let pods = [
            pod("a", "Succeeded", ""),
            pod("b", "Succeeded", ""),
            pod("c", "Succeeded", ""),
            pod("d", "Succeeded", ""),
            pod("e", "Succeeded", ""),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let done = plan(&job(spec), &refs, 0, now());
        assert!(has(&done, "Complete") && has(&done, "SuccessCriteriaMet"));
        assert_eq!(done.status.completion_time, Some(Time(now())));
        assert_eq!(done.create, 0);
    }

    #[test]
    fn failures_back_off_and_end_in_failed_past_the_limit() {
        let spec =
            json!({"completions": 1, "parallelism": 1, "backoffLimit": 2, "template": {"spec": {"containers": []}}});
        let pods = [pod("a", "Failed", "2026-01-01T00:09:55Z")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let waiting = plan(&job(spec.clone()), &refs, 0, now());
        assert_eq!(waiting.create, 0, "10 s after the failure, not 5");
        assert_eq!(waiting.wake, Some("2026-01-01T00:10:05Z".parse().unwrap()));
        assert_eq!(waiting.status.failed, Some(1));
        let pods = [pod("a", "Failed", "2026-01-01T00:05:00Z")];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(plan(&job(spec.clone()), &refs, 0, now()).create, 1);
        let pods = [pod("a", "Failed", ""), pod("b", "Failed", ""), pod("c", "Failed", ""), pod("d", "Running", "")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let failed = plan(&job(spec), &refs, 0, now());
        assert!(has(&failed, "Failed"));
        assert_eq!(failed.status.conditions.as_ref().unwrap()[1].reason.as_deref(), Some("BackoffLimitExceeded"));
        assert_eq!(failed.delete, ["d"]);
        assert_eq!(backoff(1), SignedDuration::from_secs(10));
        assert_eq!(backoff(3), SignedDuration::from_secs(40));
        assert_eq!(backoff(20), SignedDuration::from_secs(360));
    }

    #[test]
    fn the_pod_failure_policy_fails_the_job_ignores_or_counts() {
        let spec = |action: &str| {
            json!({"completions": 4, "parallelism": 2, "backoffLimit": 6, "template": {"spec": {"containers": []}},
                   "podFailurePolicy": {"rules": [
                       {"action": action, "onExitCodes": {"operator": "In", "values": [1]}},
                       {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}})
        };
        let failed = pod("a", "Failed", "2026-01-01T00:05:00Z");
        let plan_of = |action: &str| plan(&job(spec(action)), &[&failed], 0, now());
        let failing = plan_of("FailJob");
        let reason = failing.status.conditions.as_ref().unwrap()[1].clone();
        assert_eq!((reason.type_.as_str(), reason.reason.as_deref()), ("Failed", Some("PodFailurePolicy")));
        assert!(reason.message.unwrap().ends_with("failed with exit code 1 matching FailJob rule at index 0"));
        let ignored = plan_of("Ignore");
        assert_eq!(ignored.status.failed, None, "an ignored failure is not counted");
        assert!(!has(&ignored, "Failed"));
        assert_eq!(plan_of("Count").status.failed, Some(1));
    }

    #[test]
    fn indexed_jobs_run_each_index_until_it_succeeds() {
        let spec = json!({"completions": 4, "parallelism": 2, "completionMode": "Indexed",
                          "template": {"spec": {"containers": []}}});
        let with_index = |mut p: Pod, i: i32| {
            p.metadata.annotations = Some([(INDEX.to_string(), i.to_string())].into());
            p
        };
        let first = plan(&job(spec.clone()), &[], 0, now());
        assert_eq!(first.indexes, [0, 1]);
        let done0 = with_index(pod("a", "Succeeded", "2026-01-01T00:05:00Z"), 0);
        let running1 = with_index(pod("b", "Running", ""), 1);
        let next = plan(&job(spec.clone()), &[&done0, &running1], 0, now());
        assert_eq!(next.indexes, [2], "index 1 runs, index 0 is done");
        assert_eq!(next.status.completed_indexes.as_deref(), Some("0"));
        let all: Vec<Pod> =
            (0..4).map(|i| with_index(pod(&format!("p{i}"), "Succeeded", "2026-01-01T00:05:00Z"), i)).collect();
        let refs: Vec<&Pod> = all.iter().collect();
        let finished = plan(&job(spec), &refs, 0, now());
        assert!(has(&finished, "Complete"));
        assert_eq!(finished.status.completed_indexes.as_deref(), Some("0-3"));
        assert_eq!(compact(&[0, 1, 3, 5, 6].into()), "0-1,3,5-6");
    }

    #[test]
    fn deadlines_suspension_and_ttl() {
        let mut late =
            job(json!({"activeDeadlineSeconds": 60, "completions": 1, "template": {"spec": {"containers": []}}}));
        late.status =
            Some(JobStatus { start_time: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())), ..Default::default() });
        let pods = [pod("a", "Running", "")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let over = plan(&late, &refs, 0, now());
        assert!(has(&over, "Failed"));
        assert_eq!(over.delete, ["a"]);

        let suspended = plan(&job(json!({"suspend": true, "completions": 1})), &refs, 0, now());
        assert!(has(&suspended, "Suspended"));
        assert_eq!(suspended.delete, ["a"]);
        assert_eq!(suspended.status.start_time, None);

        let mut done = job(json!({"ttlSecondsAfterFinished": 600, "completions": 1}));
        done.status = Some(JobStatus {
            completion_time: Some(Time("2026-01-01T00:05:00Z".parse().unwrap())),
            conditions: Some(vec![condition(
                "Complete",
                "CompletionsReached",
                "",
                "2026-01-01T00:05:00Z".parse().unwrap(),
            )]),
            ..Default::default()
        });
        let kept = plan(&done, &[], 0, now());
        assert!(!kept.delete_job);
        assert_eq!(kept.wake, Some("2026-01-01T00:15:00Z".parse().unwrap()));
        let later: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        assert!(plan(&done, &[], 0, later).delete_job);
    }

    #[test]
    fn work_queues_finish_when_one_pod_succeeded_and_the_rest_stopped() {
        let spec = json!({"parallelism": 3, "template": {"spec": {"containers": []}}});
        assert_eq!(plan(&job(spec.clone()), &[], 0, now()).create, 3);
        let pods = [pod("a", "Succeeded", ""), pod("b", "Running", "")];
        let refs: Vec<&Pod> = pods.iter().collect();
        let draining = plan(&job(spec.clone()), &refs, 0, now());
        assert_eq!((draining.create, has(&draining, "Complete")), (0, false));
        let pods = [pod("a", "Succeeded", ""), pod("b", "Succeeded", "")];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert!(has(&plan(&job(spec), &refs, 0, now()), "Complete"));
    }
}
