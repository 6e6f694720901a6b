//! Cron schedules as CronJobs write them: five fields (minute hour day-of-month month
//! day-of-week) with `*`, `?`, lists, ranges, steps and names, or `@hourly`, `@daily`,
//! `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`. As in the cron library upstream
//! uses, when both day fields are restricted a day matching either is taken.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields restricted: either may match.
    either_day: bool,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(text: &str, min: u32, max: u32, names: &[&str], field: &str) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(index) = names.iter().position(|n| *n == lower) {
        return Ok(index as u32 + min);
    }
    let number: u32 = text.parse().map_err(|_| format!("{field}: {text:?} is not a number"))?;
    if number < min || number > max {
        return Err(format!("{field}: {number} is out of range {min}-{max}"));
    }
    Ok(number)
}

fn field(text: &str, min: u32, max: u32, names: &[&str], name: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 =
                    step.parse().ok().filter(|s| *s > 0).ok_or_else(|| format!("{name}: bad step in {part:?}"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" || range == "?" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, min, max, names, name)?, value(b, min, max, names, name)?)
        } else {
            let start = value(range, min, max, names, name)?;
            (start, if part.contains('/') { max } else { start })
        };
        if low > high {
            return Err(format!("{name}: range {range:?} runs backwards"));
        }
        let mut at = low;
        while at <= high {
            bits |= 1 << at;
            at += step;
        }
    }
    Ok(bits)
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        let expanded = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!("expected exactly 5 fields, found {}: {text:?}", fields.len()));
        };
        let unrestricted = |f: &str| f.starts_with('*') || f.starts_with('?');
        Ok(Schedule {
            minutes: field(minute, 0, 59, &[], "minute")?,
            hours: field(hour, 0, 23, &[], "hour")?,
            days: field(day, 1, 31, &[], "day of month")?,
            months: field(month, 1, 12, &MONTHS, "month")?,
            // Day of week 7 is Sunday too.
            weekdays: {
                let bits = field(weekday, 0, 7, &WEEKDAYS, "day of week")?;
                (bits & 0x7f) | ((bits >> 7) & 1)
            },
            either_day: !unrestricted(day) && !unrestricted(weekday),
        })
    }
}

impl Schedule {
    fn day_matches(&self, at: DateTime) -> bool {
        let day = self.days & (1 << at.day()) != 0;
        let weekday = self.weekdays & (1 << at.weekday().to_sunday_zero_offset()) != 0;
        if self.either_day { day || weekday } else { day && weekday }
    }

    /// The latest scheduled time in `(after, now]`, in `zone`.
    pub fn latest(&self, after: Timestamp, now: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        let floor = after.to_zoned(zone.clone()).datetime();
        let mut at = now.to_zoned(zone.clone()).datetime().with().second(0).subsec_nanosecond(0).build().ok()?;
        for _ in 0..100_000 {
            if at <= floor {
                return None;
            }
            if self.months & (1 << at.month()) == 0 {
                at = at.first_of_month().with().hour(0).minute(0).build().ok()?.checked_sub(1.minute()).ok()?;
            } else if !self.day_matches(at) {
                at = at.with().hour(0).minute(0).build().ok()?.checked_sub(1.minute()).ok()?;
            } else if self.hours & (1 << at.hour()) == 0 {
                at = at.with().minute(0).build().ok()?.checked_sub(1.minute()).ok()?;
            } else if self.minutes & (1 << at.minute()) == 0 {
                at = at.checked_sub(1.minute()).ok()?;
            } else {
                let found = zone.to_ambiguous_timestamp(at).compatible().ok()?;
                return (found > after && found <= now).then_some(found);
            }
        }
        None
    }

    /// The first scheduled time after `now`, in `zone`.
    pub fn next(&self, now: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        let mut at = now.to_zoned(zone.clone()).datetime().with().second(0).subsec_nanosecond(0).build().ok()?;
        at = at.checked_add(1.minute()).ok()?;
        for _ in 0..100_000 {
            if self.months & (1 << at.month()) == 0 {
                at = at.last_of_month().with().hour(0).minute(0).build().ok()?.checked_add(1.day()).ok()?;
            } else if !self.day_matches(at) {
                at = at.with().hour(0).minute(0).build().ok()?.checked_add(1.day()).ok()?;
            } else if self.hours & (1 << at.hour()) == 0 {
                at = at.with().minute(0).build().ok()?.checked_add(1.hour()).ok()?;
            } else if self.minutes & (1 << at.minute()) == 0 {
                at = at.checked_add(1.minute()).ok()?;
            } else {
                let found = zone.to_ambiguous_timestamp(at).compatible().ok()?;
                if found > now {
                    return Some(found);
                }
                at = at.checked_add(1.minute()).ok()?;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn schedules_parse_and_bad_ones_say_why() {
        assert!("*/5 * * * *".parse::<Schedule>().is_ok());
        assert!("0 9-17/2 * JAN-jun mon,wed,fri".parse::<Schedule>().is_ok());
        assert!("@daily".parse::<Schedule>().is_ok());
        assert_eq!("0 0 * * 7".parse::<Schedule>(), "0 0 * * sun".parse::<Schedule>());
        assert!("0 0 * * 1-7".parse::<Schedule>().is_ok());
        assert!("* * * *".parse::<Schedule>().unwrap_err().contains("5 fields"));
        assert!("61 * * * *".parse::<Schedule>().unwrap_err().contains("minute"));
        assert!("* * * * */0".parse::<Schedule>().unwrap_err().contains("step"));
        assert!("5-1 * * * *".parse::<Schedule>().unwrap_err().contains("backwards"));
    }

    #[test]
    fn latest_and_next_times() {
        let utc = TimeZone::UTC;
        let every5: Schedule = "*/5 * * * *".parse().unwrap();
        let now = ts("2026-03-10T12:07:30Z");
        assert_eq!(every5.latest(ts("2026-03-10T11:00:00Z"), now, &utc), Some(ts("2026-03-10T12:05:00Z")));
        assert_eq!(every5.latest(ts("2026-03-10T12:05:00Z"), now, &utc), None, "already ran");
        assert_eq!(every5.next(now, &utc), Some(ts("2026-03-10T12:10:00Z")));
        let monthly: Schedule = "@monthly".parse().unwrap();
        assert_eq!(monthly.latest(ts("2025-01-01T00:00:00Z"), now, &utc), Some(ts("2026-03-01T00:00:00Z")));
        assert_eq!(monthly.next(now, &utc), Some(ts("2026-04-01T00:00:00Z")));
        // Either day: the 13th, or any Monday (2026-03-16 is a Monday).
        let either: Schedule = "30 8 13 * mon".parse().unwrap();
        assert_eq!(either.next(now, &utc), Some(ts("2026-03-13T08:30:00Z")));
        assert_eq!(either.next(ts("2026-03-13T09:00:00Z"), &utc), Some(ts("2026-03-16T08:30:00Z")));
        let feb29: Schedule = "0 0 29 2 *".parse().unwrap();
        assert_eq!(feb29.next(now, &utc), Some(ts("2028-02-29T00:00:00Z")));
    }

    #[test]
    fn time_zones_move_the_schedule() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let daily: Schedule = "0 9 * * *".parse().unwrap();
        assert_eq!(daily.next(ts("2026-07-01T00:00:00Z"), &berlin), Some(ts("2026-07-01T07:00:00Z")));
    }
}
