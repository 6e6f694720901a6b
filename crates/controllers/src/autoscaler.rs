//! The horizontal pod autoscaler's arithmetic (upstream's `replica_calculator.go` and the
//! default `behavior`): how many replicas a target should have for the usage its pods report.

/// Within this much of the target, nothing changes (`--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;

/// The replicas one metric asks for: `ready` pods used `usage` in all (of `requests` in all,
/// for a utilization target), the target is `target` (a percentage of the requests, or an
/// average value per pod). Returns the replicas and what is reported as current (the
/// utilization in percent, or the average value).
pub fn replicas_for(current: i32, ready: i32, usage: i64, requests: Option<i64>, target: i64) -> Option<(i32, i64)> {
    if ready <= 0 || target <= 0 {
        return None;
    }
    let (observed, ratio) = match requests {
        Some(requests) if requests > 0 => {
            let utilization = usage * 100 / requests;
            (utilization, utilization as f64 / target as f64)
        }
        Some(_) => return None,
        None => {
            let average = usage / i64::from(ready);
            (average, usage as f64 / (target as f64 * f64::from(ready)))
        }
    };
    if (ratio - 1.0).abs() <= TOLERANCE {
        return Some((current, observed));
    }
    Some(((ratio * f64::from(ready)).ceil() as i32, observed))
}

/// Upstream's default behavior: up at most to max(2 × current, current + 4) per period; down to
/// the highest recommendation of the stabilization window; always within [min, max].
pub fn bounded(current: i32, recommended: i32, window_highest: i32, min: i32, max: i32) -> i32 {
    let wanted = if recommended > current {
        recommended.min((current * 2).max(current + 4))
    } else {
        // The highest recommendation of the window, never above what is there now.
        window_highest.min(current).max(recommended)
    };
    wanted.clamp(min, max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_follow_usage_as_upstream_computes_them() {
        // 2 pods using 400m of 200m requested, target 50%: 200% → 4 × 2 = 8.
        assert_eq!(replicas_for(2, 2, 400, Some(200), 50), Some((8, 200)));
        // Within 10% of the target: unchanged.
        assert_eq!(replicas_for(3, 3, 160, Some(300), 50), Some((3, 53)));
        // Idle: down to what the usage needs (at least one, by the bounds).
        assert_eq!(replicas_for(4, 4, 0, Some(400), 50), Some((0, 0)));
        // An average value target: 3 pods using 900 in all for 100 each → 9.
        assert_eq!(replicas_for(3, 3, 900, None, 100), Some((9, 300)));
        assert_eq!(replicas_for(2, 2, 10, Some(0), 50), None, "no requests: no utilization");
        assert_eq!(replicas_for(2, 0, 10, Some(100), 50), None, "no ready pod");
    }

    #[test]
    fn scaling_is_bounded_and_stabilized() {
        assert_eq!(bounded(1, 10, 10, 1, 20), 5, "up by 4 (or double) at most");
        assert_eq!(bounded(6, 40, 40, 1, 20), 12, "double");
        assert_eq!(bounded(4, 1, 4, 1, 10), 4, "down waits for the window's highest");
        assert_eq!(bounded(4, 1, 1, 2, 10), 2, "down to the minimum");
        assert_eq!(bounded(2, 8, 8, 1, 3), 3, "capped at max");
    }
}
