//! Runs one export: opens the snapshot, resolves tenants and ranges, reads rows through the
//! store, encodes them, hands chunks to a [`Sink`] (files for the CLI, a gRPC stream for the
//! server) and returns the manifest. The only module of `export` that does I/O.

use std::future::Future;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{PgConnection, PgPool};

use super::encode::{Chunk, FileWriter};
use super::manifest::{Manifest, ResolvedSelection, Totals};
use super::schema::{self, Schema};
use super::watermark::Watermark;
use super::{Bucket, ExportRequest, Range, Rows};
use crate::domain::FieldError;
use crate::domain::attribution::ModelFilter;
use crate::domain::period::{BillingCalendar, on_the_hour, whole_hour_offset};
use crate::store::StoreError;
use crate::store::attribution::AttributionQuery;
use crate::store::exports::{self as sql, Plan, TenantCalendar};
use crate::store::reports::Window;

/// Where chunks go, in order.
pub trait Sink {
    fn send(&mut self, chunk: Chunk) -> impl Future<Output = Result<(), ExportError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The request is valid but cannot be served in the current state.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the receiver of the export went away")]
    Closed,
}

impl From<sqlx::Error> for ExportError {
    fn from(error: sqlx::Error) -> Self {
        ExportError::Store(error.into())
    }
}

/// Rows and bytes so far, for progress bars.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Runs `request` against `pool`; `now` only stamps `generated_at`.
pub async fn run<S: Sink + Send>(
    pool: &PgPool,
    request: &ExportRequest,
    sink: &mut S,
    progress: Progress<'_>,
    now: DateTime<Utc>,
) -> Result<Manifest, ExportError> {
    let mut tx = pool.begin().await?;
    let current = sql::begin_snapshot(&mut tx).await?;
    let current = Watermark::from_snapshot(&current)
        .ok_or_else(|| ExportError::Precondition(format!("unreadable snapshot {current:?}")))?;
    let selection = &request.selection;
    let until = match &selection.until {
        Some(until) if !until.precedes(&current) => {
            return Err(
                FieldError::new("until_watermark", "is later than the database's present").into(),
            );
        }
        Some(until) => until.clone(),
        None => current.clone(),
    };
    if let Some(since) = &selection.since
        && !since.precedes(&until)
    {
        return Err(FieldError::new(
            "since_watermark",
            "is later than the export's end watermark",
        )
        .into());
    }
    let calendars = sql::tenant_calendars(&mut tx, selection.tenants.as_deref()).await?;
    let ranges = ranges(&calendars, selection.range, selection.time_zone.as_deref())?;

    let schema = request.rows.schema();
    let mut file = FileWriter::new(request.file_name(), selection.format, &schema.names());
    let mut totals = Totals::default();
    let mut emit = Emitter {
        sink,
        progress,
        schema,
    };
    if let Rows::Attribution { .. } = &request.rows {
        let rows = attribution_rows(&mut tx, request, &ranges, &current, &until).await?;
        for cells in rows {
            emit.row(&mut file, &mut totals, &cells).await?;
        }
    } else {
        let plan = Plan {
            rows: &request.rows,
            tenants: ranges.iter().map(|r| r.tenant_id.clone()).collect(),
            starts: ranges.iter().map(|r| r.start).collect(),
            ends: ranges.iter().map(|r| r.end).collect(),
            period: match selection.range {
                Range::Period(label) => Some(label.to_string()),
                Range::Span { .. } => None,
            },
            until: until.snapshot(),
            since: selection.since.as_ref().map(Watermark::snapshot),
            time_zone: selection.time_zone.clone(),
        };
        let mut rows = sql::rows(&mut tx, &plan, schema);
        while let Some(cells) = rows.try_next().await? {
            emit.row(&mut file, &mut totals, &cells).await?;
        }
    }
    let (chunks, summary) = file.finish();
    for chunk in chunks {
        emit.sink.send(chunk).await?;
    }
    tx.commit().await?;
    (emit.progress)(summary.row_count, summary.size_bytes);

    let (period, start, end) = match selection.range {
        Range::Period(label) => (Some(label.to_string()), None, None),
        Range::Span { start, end } => (None, Some(start), Some(end)),
    };
    Ok(Manifest {
        kind: schema.kind.as_str().to_owned(),
        format: selection.format.as_str().to_owned(),
        row_count: summary.row_count,
        files: vec![summary],
        totals: totals.into_list(),
        watermark: until.to_string(),
        since_watermark: selection
            .since
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        selection: ResolvedSelection {
            period,
            start,
            end,
            tenant_ids: selection.tenants.clone().unwrap_or_default(),
            time_zone: selection.time_zone.clone().unwrap_or_default(),
        },
        columns: schema.names().into_iter().map(str::to_owned).collect(),
        schema_version: schema.version,
        generated_at: now,
    })
}

struct Emitter<'s, 'p, S> {
    sink: &'s mut S,
    progress: Progress<'p>,
    schema: Schema,
}

impl<S: Sink + Send> Emitter<'_, '_, S> {
    async fn row(
        &mut self,
        file: &mut FileWriter,
        totals: &mut Totals,
        cells: &[super::encode::Cell],
    ) -> Result<(), ExportError> {
        file.push(cells);
        totals.add(&self.schema, cells);
        let chunks = file.ready_chunks();
        if !chunks.is_empty() || file.rows().is_multiple_of(1024) {
            (self.progress)(file.rows(), file.size());
        }
        for chunk in chunks {
            self.sink.send(chunk).await?;
        }
        Ok(())
    }
}

/// One tenant's `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRange {
    pub tenant_id: String,
    pub zone: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Each tenant's range: its billing period of that label (cut in `time_zone` when given), or
/// the span.
pub fn ranges(
    calendars: &[TenantCalendar],
    range: Range,
    time_zone: Option<&str>,
) -> Result<Vec<TenantRange>, FieldError> {
    calendars
        .iter()
        .map(|tenant| {
            let zone = time_zone.unwrap_or(&tenant.billing_timezone).to_owned();
            let (start, end) = match range {
                Range::Period(label) => {
                    let calendar = BillingCalendar::parse(&zone, tenant.billing_anchor_day)
                        .map_err(|e| FieldError::new("time_zone", e.reason))?;
                    let period = calendar.period(label);
                    (period.start, period.end)
                }
                Range::Span { start, end } => (start, end),
            };
            Ok(TenantRange {
                tenant_id: tenant.tenant_id.clone(),
                zone,
                start,
                end,
            })
        })
        .collect()
}

/// Attribution rows, always per tenant. Attribution reads hourly rollups, which keep no
/// history, so it can be exported only as of the present: `until` is accepted when none of
/// its inputs changed since. With `since`, every group of each tenant whose inputs (usage or
/// lifecycle events) changed is recomputed whole and exported again.
async fn attribution_rows(
    conn: &mut PgConnection,
    request: &ExportRequest,
    ranges: &[TenantRange],
    current: &Watermark,
    until: &Watermark,
) -> Result<Vec<Vec<super::encode::Cell>>, ExportError> {
    let Rows::Attribution {
        bucket,
        grouping,
        filters,
    } = &request.rows
    else {
        return Ok(Vec::new());
    };
    let window = match bucket {
        Bucket::Whole => Window::Whole,
        Bucket::Day => Window::Day,
        Bucket::Month => Window::Month,
        Bucket::Hour => return Err(FieldError::new("window", "must be NONE, DAY or MONTH").into()),
    };
    let all: Vec<String> = ranges.iter().map(|r| r.tenant_id.clone()).collect();
    if until != current
        && !sql::changed_tenants(conn, &all, &until.snapshot(), &current.snapshot())
            .await?
            .is_empty()
    {
        return Err(ExportError::Precondition(
            "until_watermark: attribution inputs changed since this watermark, and attribution can only be exported as of now".to_owned(),
        ));
    }
    let selected = match &request.selection.since {
        Some(since) => {
            sql::changed_tenants(conn, &all, &since.snapshot(), &until.snapshot()).await?
        }
        None => all,
    };
    let models = ModelFilter {
        providers: filters.providers.clone(),
        models: filters.models.clone(),
    };
    let mut grouping = *grouping;
    grouping.tenant = true;
    // Tenants sharing a range and zone are read together.
    let mut groups: Vec<(&TenantRange, Vec<String>)> = Vec::new();
    // Attribution reads hourly rollups: a range, and with local days or months each bucket,
    // must start on a whole UTC hour, or some usage would land in the wrong bucket.
    let by_period = matches!(request.selection.range, Range::Period(_));
    for range in ranges.iter().filter(|r| selected.contains(&r.tenant_id)) {
        if !on_the_hour(range.start) || !on_the_hour(range.end) {
            let (field, remedy) = if by_period {
                (
                    "period",
                    "its billing zone is not a whole number of hours from UTC; export it with --from/--to on whole hours",
                )
            } else {
                ("time_range", "bounds must fall on whole hours")
            };
            return Err(FieldError::new(
                field,
                format!(
                    "tenant {}: {remedy} (attribution reads hourly rollups)",
                    range.tenant_id
                ),
            )
            .into());
        }
        let zone: chrono_tz::Tz = range.zone.parse().map_err(|_| {
            FieldError::new(
                "time_zone",
                format!("{:?} is not an IANA time zone name", range.zone),
            )
        })?;
        if window != Window::Whole
            && !(whole_hour_offset(zone, range.start) && whole_hour_offset(zone, range.end))
        {
            return Err(FieldError::new(
                "time_zone",
                format!(
                    "tenant {}: {} is not a whole number of hours from UTC, so hourly rollups cannot cut its days; export with --time-zone UTC or --window none",
                    range.tenant_id, range.zone
                ),
            )
            .into());
        }
        match groups
            .iter_mut()
            .find(|(r, _)| (r.start, r.end, &r.zone) == (range.start, range.end, &range.zone))
        {
            Some((_, tenants)) => tenants.push(range.tenant_id.clone()),
            None => groups.push((range, vec![range.tenant_id.clone()])),
        }
    }
    let mut rows = Vec::new();
    for (range, tenant_ids) in groups {
        let query = AttributionQuery {
            tenant_ids,
            start: range.start,
            end: range.end,
            window,
            time_zone: range.zone.clone(),
            agent_ids: filters.agent_ids.clone(),
            services: filters.services.clone(),
            providers: filters.providers.clone(),
            models: filters.models.clone(),
        };
        let report = crate::store::attribution::report(conn, &query, grouping, &models).await?;
        let attributed = report.rows;
        for (key, row) in attributed {
            let bucket_end = report
                .bucket_ends
                .get(&key.bucket)
                .copied()
                .unwrap_or(range.end);
            rows.push((
                key.clone(),
                schema::attribution_cells(&key, &row, bucket_end),
            ));
        }
    }
    rows.sort_by(|(a, _), (b, _)| (&a.tenant_id, a).cmp(&(&b.tenant_id, b)));
    Ok(rows.into_iter().map(|(_, cells)| cells).collect())
}
