//! Billing: reads a period's usage from the rollups, prices it with the catalog, and keeps
//! invoices through draft → finalized → void. The arithmetic lives in `domain::invoice`; this
//! module decides which usage, which periods and which rows, and holds the transactions.
//!
//! Late usage: each finalized invoice stores what it billed per (period, rate key). A later
//! invoice recomputes every finalized period of the tenant still within raw-event retention and
//! bills the difference as ADJUSTMENT lines, so usage arriving after finalization is billed
//! once, on the next invoice finalized. A draft computes the same adjustments while it is live.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::{PgConnection, PgPool};

use crate::config::BillingSettings;
use crate::domain::FieldError;
use crate::domain::invoice::{
    Adjustment, ComputedInvoice, InvoiceState, KeyUsage, Terms, UsageSlice, charge_period,
    compute_invoice,
};
use crate::domain::money::Currency;
use crate::domain::period::{BillingCalendar, BillingPeriod, PeriodLabel};
use crate::domain::pricing::{PricingCatalog, RateKey};
use crate::domain::tenant::Tenant;
use crate::ingest::pricing_cache::PricingCache;
use crate::store::invoices::{self as stored, Computed, InvoiceRecord, NewDraft, UsageRange};
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    FailedPrecondition(String),
}

/// What ClosePeriod did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    pub tenants_considered: i64,
    pub invoices_finalized: i64,
    pub invoices_already_final: i64,
    /// (tenant, lowercase reason)
    pub failures: Vec<(String, String)>,
}

pub struct Billing {
    pool: PgPool,
    pricing: PricingCache,
    settings: BillingSettings,
    /// Raw events older than this are gone (and rejected at ingest), so periods before it
    /// cannot change and are not recomputed for adjustments.
    retention: Duration,
    fold_max_events: u64,
}

/// One invoice to compute: the tenant, its period and the terms it is billed with.
struct Job {
    tenant_id: String,
    period: BillingPeriod,
    terms: Terms,
}

/// A stretch of constant pricing of one period of one job.
struct Slot {
    job: usize,
    /// 0 = the job's own period, then its closed periods.
    period: usize,
    start: DateTime<Utc>,
}

fn calendar_of(tenant: &Tenant) -> Result<BillingCalendar, String> {
    BillingCalendar::parse(&tenant.billing_timezone, tenant.billing_anchor_day)
        .map_err(|e| e.to_string())
}

fn terms_of(tenant: &Tenant) -> Result<Terms, String> {
    let currency = Currency::from_code(&tenant.currency).ok_or_else(|| {
        format!(
            "currency {} is not an iso 4217 currency with minor units",
            tenant.currency
        )
    })?;
    Ok(Terms {
        currency,
        rounding: tenant.rounding_mode,
        tax_rate_percent: tenant.tax_rate_percent,
    })
}

fn floor_hour(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::hours(1)).unwrap_or(at)
}

/// Splits `[start, end)` into whole UTC hours (read from the hourly rollups) and the partial
/// hours at its edges (read from the raw events).
fn split_hours(
    slot: i32,
    tenant_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Vec<UsageRange> {
    let range = |start, end, raw| UsageRange {
        slot,
        tenant_id: tenant_id.to_owned(),
        start,
        end,
        raw,
    };
    let first_whole = if floor_hour(start) == start {
        start
    } else {
        floor_hour(start) + TimeDelta::hours(1)
    };
    let last_whole = floor_hour(end);
    if first_whole >= last_whole {
        return vec![range(start, end, true)];
    }
    let mut ranges = vec![range(first_whole, last_whole, false)];
    if start < first_whole {
        ranges.push(range(start, first_whole, true));
    }
    if last_whole < end {
        ranges.push(range(last_whole, end, true));
    }
    ranges
}

/// A closed or open period's usage: per key, (slot, tokens, events) in slot order.
type PeriodUsage = BTreeMap<RateKey, BTreeMap<i32, (i64, i64)>>;

impl Billing {
    /// `fold_max_events`: the window of the folds run before finalizing (`fold.max_events`).
    pub fn new(
        pool: PgPool,
        settings: BillingSettings,
        default_price_book_id: String,
        retention: Duration,
        fold_max_events: u64,
    ) -> Self {
        Self {
            pricing: PricingCache::new(pool.clone(), default_price_book_id),
            pool,
            settings,
            retention,
            fold_max_events,
        }
    }

    /// Folds what ingest has queued, so that a finalized invoice and the rollups agree (the
    /// invoice is exact either way: it also reads batches still queued).
    async fn fold_queued(&self) -> Result<(), BillingError> {
        crate::store::fold::fold_all(&self.pool, self.fold_max_events).await?;
        Ok(())
    }

    pub fn settings(&self) -> &BillingSettings {
        &self.settings
    }

    fn retained_since(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        crate::app::retention_cutoff(now, self.retention)
    }

    /// Computes the invoices of `jobs` in a few statements, whatever their number: one query
    /// for the closed periods, one for what they billed, one for every quantity.
    async fn compute(
        &self,
        conn: &mut PgConnection,
        catalog: &PricingCatalog,
        jobs: &[Job],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<ComputedInvoice, String>>, StoreError> {
        let tenants: Vec<(String, String)> = jobs
            .iter()
            .map(|j| (j.tenant_id.clone(), j.terms.currency.code.clone()))
            .collect();
        let closed = stored::closed_periods(conn, &tenants, self.retained_since(now)).await?;
        let mut closed_by_tenant: HashMap<&str, Vec<&stored::ClosedPeriod>> = HashMap::new();
        for c in &closed {
            closed_by_tenant
                .entry(c.tenant_id.as_str())
                .or_default()
                .push(c);
        }
        let periods: Vec<Vec<BillingPeriod>> = jobs
            .iter()
            .map(|job| {
                let mut list = vec![job.period];
                let mut earlier: Vec<BillingPeriod> = closed_by_tenant
                    .get(job.tenant_id.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|c| c.finalized && c.period.start < job.period.start)
                    .map(|c| c.period)
                    .collect();
                earlier.sort_by_key(|p| p.start);
                list.extend(earlier);
                list
            })
            .collect();
        // Billed amounts exist only for closed periods, and for a job's own period only when an
        // invoice of it was voided (its adjustments may sit on later invoices).
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (job, list) in jobs.iter().zip(&periods) {
            let own_voided = closed_by_tenant
                .get(job.tenant_id.as_str())
                .into_iter()
                .flatten()
                .any(|c| c.period.label == job.period.label);
            let skip_own = usize::from(!own_voided);
            pairs.extend(
                list.iter()
                    .skip(skip_own)
                    .map(|p| (job.tenant_id.clone(), p.label.to_string())),
            );
        }
        let billed = stored::billed(conn, &pairs).await?;

        let mut slots: Vec<Slot> = Vec::new();
        let mut ranges: Vec<UsageRange> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            for (k, period) in periods[j].iter().enumerate() {
                let mut edges = vec![period.start];
                edges.extend(catalog.pricing_changes(&job.tenant_id, period.start, period.end));
                edges.push(period.end);
                for pair in edges.windows(2) {
                    let slot = i32::try_from(slots.len()).unwrap_or(i32::MAX);
                    slots.push(Slot {
                        job: j,
                        period: k,
                        start: pair[0],
                    });
                    ranges.extend(split_hours(slot, &job.tenant_id, pair[0], pair[1]));
                }
            }
        }
        let mut usage: HashMap<(usize, usize), PeriodUsage> = HashMap::new();
        for q in stored::quantities(conn, &ranges).await? {
            let Some(slot) = usize::try_from(q.slot).ok().and_then(|i| slots.get(i)) else {
                continue;
            };
            let entry = usage
                .entry((slot.job, slot.period))
                .or_default()
                .entry(q.key)
                .or_default()
                .entry(q.slot)
                .or_default();
            entry.0 += q.tokens;
            entry.1 += q.events;
        }

        let key_usage = |job: &Job, per_key: Option<&PeriodUsage>| -> Vec<KeyUsage> {
            per_key
                .into_iter()
                .flatten()
                .map(|(key, by_slot)| KeyUsage {
                    key: key.clone(),
                    slices: by_slot
                        .iter()
                        .map(|(slot, (tokens, events))| UsageSlice {
                            pricing: usize::try_from(*slot)
                                .ok()
                                .and_then(|i| slots.get(i))
                                .and_then(|s| {
                                    catalog.invoice_pricing(&job.tenant_id, key, s.start)
                                }),
                            quantity: *tokens,
                            events: *events,
                        })
                        .collect(),
                })
                .collect()
        };
        let empty = HashMap::new();
        Ok(jobs
            .iter()
            .enumerate()
            .map(|(j, job)| {
                let billed_of = |period: &BillingPeriod| {
                    billed
                        .get(&(job.tenant_id.clone(), period.label.to_string()))
                        .unwrap_or(&empty)
                        .iter()
                        .map(|(k, c)| (k.clone(), c.clone()))
                        .collect::<BTreeMap<_, _>>()
                };
                let own = key_usage(job, usage.get(&(j, 0)));
                let mut adjustments = Vec::new();
                // Billed for this very period by other invoices (adjustments made while its
                // voided predecessor was final): this invoice bills the rest.
                let own_billed = billed_of(&job.period);
                if !own_billed.is_empty() {
                    adjustments.push(Adjustment {
                        period: job.period,
                        expected: BTreeMap::new(),
                        billed: own_billed,
                    });
                }
                for (k, period) in periods[j].iter().enumerate().skip(1) {
                    let expected = charge_period(&key_usage(job, usage.get(&(j, k))))
                        .map_err(|e| e.to_string())?
                        .per_key;
                    adjustments.push(Adjustment {
                        period: *period,
                        expected,
                        billed: billed_of(period),
                    });
                }
                compute_invoice(&job.terms, job.period, &own, &adjustments)
                    .map_err(|e| e.to_string())
            })
            .collect())
    }

    async fn tenant(&self, tenant_id: &str) -> Result<Tenant, BillingError> {
        Ok(store::tenants::get(&self.pool, tenant_id).await?)
    }

    fn job_for(tenant: &Tenant, period: BillingPeriod) -> Result<Job, BillingError> {
        Ok(Job {
            tenant_id: tenant.tenant_id.clone(),
            period,
            terms: terms_of(tenant).map_err(BillingError::FailedPrecondition)?,
        })
    }

    fn new_draft(job: &Job, replaces: Option<String>) -> NewDraft {
        NewDraft {
            invoice_id: uuid::Uuid::now_v7().to_string(),
            tenant_id: job.tenant_id.clone(),
            period: job.period,
            currency: job.terms.currency.code.clone(),
            currency_exponent: i16::try_from(job.terms.currency.exponent).unwrap_or(i16::MAX),
            rounding_mode: job.terms.rounding,
            replaces_invoice_id: replaces,
        }
    }

    /// Recomputes a locked draft and stores its figures and lines.
    async fn refresh_draft(
        &self,
        conn: &mut PgConnection,
        job: &Job,
        invoice_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), BillingError> {
        let catalog = self.pricing.catalog().await?;
        let computed = self
            .compute(conn, &catalog, std::slice::from_ref(job), now)
            .await?
            .pop()
            .unwrap_or_else(|| Err("nothing computed".into()))
            .map_err(BillingError::FailedPrecondition)?;
        stored::store_drafts(
            conn,
            &[Computed {
                invoice_id,
                tenant_id: &job.tenant_id,
                terms: &job.terms,
                invoice: &computed,
            }],
            now,
        )
        .await?;
        Ok(())
    }

    async fn with_lines(
        &self,
        tenant_id: &str,
        invoice_id: &str,
    ) -> Result<InvoiceRecord, BillingError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let mut invoice = [stored::get(&mut conn, tenant_id, invoice_id).await?];
        stored::attach_lines(&mut conn, &mut invoice).await?;
        let [invoice] = invoice;
        Ok(invoice)
    }

    /// The live draft of a tenant's period (the one containing `now` when `label` is `None`),
    /// recomputed from the rollups now. Creates the draft row on first use so it has an id.
    pub async fn preview(
        &self,
        tenant_id: &str,
        label: Option<PeriodLabel>,
        now: DateTime<Utc>,
    ) -> Result<InvoiceRecord, BillingError> {
        let tenant = self.tenant(tenant_id).await?;
        let calendar = calendar_of(&tenant).map_err(BillingError::FailedPrecondition)?;
        let period = label.map_or_else(|| calendar.period_containing(now), |l| calendar.period(l));
        if period.start > now {
            return Err(FieldError::new(
                "period",
                format!(
                    "{} has not started (it starts {})",
                    period.label,
                    period.start.to_rfc3339()
                ),
            )
            .into());
        }
        let job = Self::job_for(&tenant, period)?;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let locked = stored::lock_live(&mut tx, &[Self::new_draft(&job, None)]).await?;
        let Some(invoice) = locked.into_iter().next() else {
            return Err(BillingError::FailedPrecondition("no live invoice".into()));
        };
        if invoice.state != InvoiceState::Draft {
            return Err(BillingError::FailedPrecondition(format!(
                "period {} of tenant {tenant_id} is finalized as {}: read it with GetInvoice",
                period.label,
                invoice.number.as_deref().unwrap_or_default()
            )));
        }
        self.refresh_draft(&mut tx, &job, &invoice.invoice_id, now)
            .await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.with_lines(tenant_id, &invoice.invoice_id).await
    }

    /// One invoice with its lines; a draft is recomputed first.
    pub async fn get(
        &self,
        tenant_id: &str,
        invoice_id: &str,
        now: DateTime<Utc>,
    ) -> Result<InvoiceRecord, BillingError> {
        self.fold_queued().await?;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let invoice = stored::lock_one(&mut tx, tenant_id, invoice_id).await?;
        if invoice.state == InvoiceState::Draft {
            let tenant = self.tenant(tenant_id).await?;
            let job = Self::job_for(&tenant, invoice.period)?;
            self.refresh_draft(&mut tx, &job, invoice_id, now).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.with_lines(tenant_id, invoice_id).await
    }

    pub async fn list(
        &self,
        filter: &stored::ListFilter,
        include_lines: bool,
    ) -> Result<Vec<InvoiceRecord>, BillingError> {
        let mut invoices = stored::list(&self.pool, filter).await?;
        if include_lines {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            stored::attach_lines(&mut conn, &mut invoices).await?;
        }
        Ok(invoices)
    }

    /// Why `period` cannot be finalized at `now`, if it cannot.
    fn not_yet(
        &self,
        period: &BillingPeriod,
        ignore_grace: bool,
        now: DateTime<Utc>,
    ) -> Option<String> {
        if now < period.end {
            return Some(format!(
                "period {} ends {}",
                period.label,
                period.end.to_rfc3339()
            ));
        }
        let grace =
            chrono::Duration::from_std(self.settings.finalize_grace).unwrap_or(TimeDelta::MAX);
        let grace_end = period
            .end
            .checked_add_signed(grace)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        (!ignore_grace && now < grace_end)
            .then(|| format!("grace period ends {}", grace_end.to_rfc3339()))
    }

    /// Finalizes one draft (a finalized invoice comes back unchanged).
    pub async fn finalize(
        &self,
        tenant_id: &str,
        invoice_id: &str,
        ignore_grace: bool,
        now: DateTime<Utc>,
    ) -> Result<InvoiceRecord, BillingError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let invoice = stored::lock_one(&mut tx, tenant_id, invoice_id).await?;
        match invoice.state {
            InvoiceState::Finalized => {}
            InvoiceState::Void => {
                return Err(BillingError::FailedPrecondition(format!(
                    "invoice {invoice_id} is void; finalize its replacement {}",
                    invoice
                        .replacement_invoice_id
                        .as_deref()
                        .unwrap_or_default()
                )));
            }
            InvoiceState::Draft => {
                if let Some(reason) = self.not_yet(&invoice.period, ignore_grace, now) {
                    return Err(BillingError::FailedPrecondition(reason));
                }
                let tenant = self.tenant(tenant_id).await?;
                let job = Self::job_for(&tenant, invoice.period)?;
                let catalog = self.pricing.catalog().await?;
                let computed = self
                    .compute(&mut tx, &catalog, std::slice::from_ref(&job), now)
                    .await?
                    .pop()
                    .unwrap_or_else(|| Err("nothing computed".into()))
                    .map_err(BillingError::FailedPrecondition)?;
                stored::finalize(
                    &mut tx,
                    &[Computed {
                        invoice_id,
                        tenant_id,
                        terms: &job.terms,
                        invoice: &computed,
                    }],
                    &self.settings.number_prefix,
                    now,
                )
                .await?;
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.with_lines(tenant_id, invoice_id).await
    }

    /// Voids a finalized invoice and creates (and computes) its replacement draft. Voiding a
    /// void invoice returns it and its replacement unchanged.
    pub async fn void(
        &self,
        tenant_id: &str,
        invoice_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(InvoiceRecord, InvoiceRecord), BillingError> {
        if reason.trim().is_empty() {
            return Err(FieldError::new("reason", "is required").into());
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let invoice = stored::lock_one(&mut tx, tenant_id, invoice_id).await?;
        let replacement_id = match invoice.state {
            InvoiceState::Draft => {
                return Err(BillingError::FailedPrecondition(format!(
                    "invoice {invoice_id} is a draft; only finalized invoices can be voided"
                )));
            }
            InvoiceState::Void => invoice.replacement_invoice_id.clone().unwrap_or_default(),
            InvoiceState::Finalized => {
                let tenant = self.tenant(tenant_id).await?;
                let job = Self::job_for(&tenant, invoice.period)?;
                let draft = Self::new_draft(&job, Some(invoice_id.to_owned()));
                stored::void(&mut tx, &invoice, reason, &draft.invoice_id, now).await?;
                let locked = stored::lock_live(&mut tx, std::slice::from_ref(&draft)).await?;
                let replacement = locked
                    .into_iter()
                    .next()
                    .map_or(draft.invoice_id.clone(), |r| r.invoice_id);
                self.refresh_draft(&mut tx, &job, &replacement, now).await?;
                replacement
            }
        };
        tx.commit().await.map_err(StoreError::from)?;
        Ok((
            self.with_lines(tenant_id, invoice_id).await?,
            self.with_lines(tenant_id, &replacement_id).await?,
        ))
    }

    /// Finalizes the drafts of the period labelled `label` of every tenant in `tenant_ids`
    /// (all tenants when `None`). Tenants go in batches, each one transaction; replicas
    /// closing the same period queue on the invoice rows and skip what the other finalized.
    pub async fn close_period(
        &self,
        label: PeriodLabel,
        tenant_ids: Option<&[String]>,
        ignore_grace: bool,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<CloseReport, BillingError> {
        let mut report = CloseReport::default();
        let mut candidates = Vec::new();
        for tenant in self.tenants(tenant_ids, &mut report).await? {
            match calendar_of(&tenant) {
                Ok(calendar) => candidates.push((calendar.period(label), tenant)),
                Err(reason) => report.failures.push((tenant.tenant_id.clone(), reason)),
            }
        }
        // A tenant created after the period gets no (empty) invoice for it, unless it has usage
        // there: auto-created tenants are created by their first event, however old it is.
        let late: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = candidates
            .iter()
            .filter(|(period, tenant)| tenant.created_at >= period.end)
            .map(|(period, tenant)| (tenant.tenant_id.clone(), period.start, period.end))
            .collect();
        let late_with_usage = if late.is_empty() {
            Default::default()
        } else {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            stored::tenants_with_usage(&mut conn, &late).await?
        };
        let mut jobs = Vec::new();
        for (period, tenant) in candidates {
            if tenant.created_at >= period.end && !late_with_usage.contains(&tenant.tenant_id) {
                continue;
            }
            report.tenants_considered += 1;
            if let Some(reason) = self.not_yet(&period, ignore_grace, now) {
                report.failures.push((tenant.tenant_id.clone(), reason));
                continue;
            }
            match Self::job_for(&tenant, period) {
                Ok(job) => jobs.push(job),
                Err(e) => report
                    .failures
                    .push((tenant.tenant_id.clone(), e.to_string())),
            }
        }
        jobs.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
        let batches = jobs.chunks(self.settings.close_batch_tenants.max(1));
        if !dry_run {
            self.fold_queued().await?;
            let catalog = self.pricing.catalog().await?;
            // Two batches in flight: one computes or writes while the other waits on Postgres.
            // They hold disjoint tenants, and the numbering row serializes only their ends.
            let mut pending = Vec::new();
            for batch in batches {
                pending.push(self.close_batch(&catalog, batch, now));
            }
            let partials: Vec<CloseReport> = futures::stream::iter(pending)
                .buffer_unordered(2)
                .try_collect()
                .await?;
            for partial in partials {
                report.invoices_finalized += partial.invoices_finalized;
                report.invoices_already_final += partial.invoices_already_final;
                report.failures.extend(partial.failures);
            }
            return Ok(report);
        }
        for batch in batches {
            {
                let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
                let ids: Vec<String> = batch.iter().map(|j| j.tenant_id.clone()).collect();
                let states = stored::live_states(&mut conn, &ids, label).await?;
                for job in batch {
                    match states.get(&job.tenant_id) {
                        Some(InvoiceState::Finalized) => report.invoices_already_final += 1,
                        _ => report.invoices_finalized += 1,
                    }
                }
            }
        }
        Ok(report)
    }

    async fn tenants(
        &self,
        tenant_ids: Option<&[String]>,
        report: &mut CloseReport,
    ) -> Result<Vec<Tenant>, BillingError> {
        let mut tenants = Vec::new();
        let mut after = String::new();
        loop {
            let page = store::tenants::list(&self.pool, &after, &[], 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.tenant_id.clone();
            tenants.extend(page);
        }
        if let Some(wanted) = tenant_ids {
            for id in wanted {
                if !tenants.iter().any(|t| &t.tenant_id == id) {
                    report.failures.push((id.clone(), "unknown tenant".into()));
                }
            }
            tenants.retain(|t| wanted.contains(&t.tenant_id));
        }
        Ok(tenants)
    }

    async fn close_batch(
        &self,
        catalog: &PricingCatalog,
        batch: &[Job],
        now: DateTime<Utc>,
    ) -> Result<CloseReport, BillingError> {
        let mut report = CloseReport::default();
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let drafts: Vec<NewDraft> = batch.iter().map(|j| Self::new_draft(j, None)).collect();
        let locked = stored::lock_live(&mut tx, &drafts).await?;
        let by_tenant: HashMap<&str, &InvoiceRecord> =
            locked.iter().map(|i| (i.tenant_id.as_str(), i)).collect();
        let mut pending: Vec<(&Job, &str)> = Vec::new();
        for job in batch {
            match by_tenant.get(job.tenant_id.as_str()) {
                Some(invoice) if invoice.state == InvoiceState::Draft => {
                    pending.push((job, invoice.invoice_id.as_str()));
                }
                Some(_) => report.invoices_already_final += 1,
                None => report.failures.push((
                    job.tenant_id.clone(),
                    "no live invoice could be created".into(),
                )),
            }
        }
        let jobs: Vec<Job> = pending
            .iter()
            .map(|(job, _)| Job {
                tenant_id: job.tenant_id.clone(),
                period: job.period,
                terms: job.terms.clone(),
            })
            .collect();
        let results = self.compute(&mut tx, catalog, &jobs, now).await?;
        let mut ready = Vec::new();
        for ((job, invoice_id), result) in pending.iter().zip(&results) {
            match result {
                Ok(invoice) => ready.push(Computed {
                    invoice_id,
                    tenant_id: &job.tenant_id,
                    terms: &job.terms,
                    invoice,
                }),
                Err(reason) => report
                    .failures
                    .push((job.tenant_id.clone(), reason.clone())),
            }
        }
        let numbers = stored::finalize(&mut tx, &ready, &self.settings.number_prefix, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        report.invoices_finalized += i64::try_from(numbers.len()).unwrap_or(i64::MAX);
        Ok(report)
    }
}

/// The background job of `serve`: every `close_interval`, closes the two most recent monthly
/// labels (a tenant's anchor day and zone shift which label has just ended). Tenants still in
/// their grace period are retried at the next tick.
pub async fn run_close_job(billing: Arc<Billing>, shutdown: tokio_util::sync::CancellationToken) {
    let interval = billing.settings().close_interval;
    // The first tick waits a whole interval, so a freshly started instance does not race an
    // operator who is about to close by hand.
    crate::periodic::every(interval, interval, shutdown, || {
        let billing = billing.clone();
        async move {
        let now = Utc::now();
        let current = BillingCalendar {
            zone: chrono_tz::UTC,
            anchor_day: 1,
        }
        .period_containing(now)
        .label;
        for label in [current.previous().previous(), current.previous()] {
            match billing.close_period(label, None, false, false, now).await {
                Ok(report) => {
                    if report.invoices_finalized > 0 {
                        tracing::info!(period = %label, finalized = report.invoices_finalized, "closed billing period");
                    }
                    let unexpected = report
                        .failures
                        .iter()
                        // "period … ends …" and "grace period ends …" are retried next tick.
                        .filter(|(_, reason)| !reason.contains(" ends "))
                        .count();
                    if unexpected > 0 {
                        tracing::warn!(period = %label, failures = unexpected, "some invoices could not be finalized");
                    }
                }
                Err(e) => {
                    tracing::warn!(period = %label, error = %e, "closing billing period failed; retrying next interval")
                }
            }
        }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("rfc3339")
    }

    fn parts(ranges: &[UsageRange]) -> Vec<(String, String, bool)> {
        ranges
            .iter()
            .map(|r| {
                (
                    r.start.format("%H:%M").to_string(),
                    r.end.format("%H:%M").to_string(),
                    r.raw,
                )
            })
            .collect()
    }

    #[test]
    fn whole_hours_come_from_rollups_and_partial_edges_from_raw_events() {
        let ranges = split_hours(
            0,
            "t",
            utc("2026-03-01T05:30:00Z"),
            utc("2026-03-01T09:15:00Z"),
        );

        assert_eq!(
            parts(&ranges),
            vec![
                ("06:00".into(), "09:00".into(), false),
                ("05:30".into(), "06:00".into(), true),
                ("09:00".into(), "09:15".into(), true),
            ]
        );
    }

    #[test]
    fn aligned_bounds_need_no_raw_events_and_a_sub_hour_stretch_needs_only_them() {
        let aligned = split_hours(
            0,
            "t",
            utc("2026-03-01T00:00:00Z"),
            utc("2026-04-01T00:00:00Z"),
        );
        let short = split_hours(
            0,
            "t",
            utc("2026-03-01T10:10:00Z"),
            utc("2026-03-01T11:20:00Z"),
        );

        assert_eq!(
            parts(&aligned),
            vec![("00:00".into(), "00:00".into(), false)]
        );
        assert_eq!(parts(&short), vec![("10:10".into(), "11:20".into(), true)]);
    }
}
