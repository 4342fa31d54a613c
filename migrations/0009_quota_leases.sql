-- Budget leases: a replica decides Reserve calls from a slice of a policy's window budget that it
-- leased from the counter row, and writes the reservations it granted afterwards, in batches.
--
-- Why a hard limit still holds: `leased` joins `used` and `reserved` on the counter row, and a
-- slice is only taken under that row's lock while used + reserved + leased + slice <= limit.
-- A replica grants from memory no more than it leased; writing a granted reservation moves its
-- hold from `leased` to `reserved` (on the counter and on the lease row) in one transaction, so
-- the sum never grows. Every other writer of the counter takes the same row lock as before.

ALTER TABLE quota_counters
    ADD COLUMN leased numeric NOT NULL DEFAULT 0 CHECK (leased >= 0);

-- One replica's slice of one counter. `granted` is what it still holds: granted to callers but
-- not yet written, or not granted at all. The replica stops granting from it before
-- `expires_at` (measured from before it asked, so clock skew cannot extend it); a crashed
-- replica's slice returns to the budget at `reclaim_at` = expires_at + the leaser's largest
-- reservation TTL, when every hold it may have promised and not written has lapsed.
CREATE TABLE quota_leases (
    tenant_id    text COLLATE "C" NOT NULL,
    policy_id    text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    replica_id   uuid NOT NULL,
    granted      numeric NOT NULL CHECK (granted >= 0),
    expires_at   timestamptz NOT NULL,
    reclaim_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, policy_id, window_start, replica_id),
    FOREIGN KEY (tenant_id, policy_id, window_start)
        REFERENCES quota_counters (tenant_id, policy_id, window_start) ON DELETE CASCADE
);
-- The reclaim sweep's read.
CREATE INDEX quota_leases_reclaim ON quota_leases (reclaim_at);
