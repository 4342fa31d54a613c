//! Rows → file bytes: RFC 4180 CSV (header row, CRLF) or JSON Lines, hashed and cut into
//! chunks as they grow. Pure: bytes in memory, no files, no clock.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

/// The most bytes one chunk carries (the proto's 1 MiB).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    /// The file extension.
    pub const fn extension(self) -> &'static str {
        self.as_str()
    }
}

/// One value of a row. Amounts stay exact decimals (written as strings in both formats, with
/// the scale they were stored with); token counts and row counts are integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// An absent optional value: an empty CSV field, JSON `null`.
    Null,
    Text(String),
    Int(i64),
    Amount(Decimal),
    /// RFC 3339 in UTC with microseconds, the storage precision.
    Time(DateTime<Utc>),
    Bool(bool),
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Text(text) => text.clone(),
            Cell::Int(n) => n.to_string(),
            Cell::Amount(amount) => amount.to_string(),
            Cell::Time(at) => at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            Cell::Bool(b) => b.to_string(),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Cell::Null => serde_json::Value::Null,
            Cell::Int(n) => serde_json::Value::from(*n),
            Cell::Bool(b) => serde_json::Value::Bool(*b),
            other => serde_json::Value::String(other.text()),
        }
    }
}

/// Encodes rows of a fixed column list in one format.
pub struct Encoder {
    format: Format,
    columns: Vec<&'static str>,
    csv: csv::WriterBuilder,
}

impl Encoder {
    pub fn new(format: Format, columns: &[&'static str]) -> Self {
        Self {
            format,
            columns: columns.to_vec(),
            csv: {
                let mut builder = csv::WriterBuilder::new();
                builder
                    .terminator(csv::Terminator::CRLF)
                    .buffer_capacity(1024);
                builder
            },
        }
    }

    /// The bytes a file starts with: the CSV header row, nothing for JSON Lines.
    pub fn header(&mut self) -> Vec<u8> {
        match self.format {
            Format::Csv => self.csv_record(self.columns.clone()),
            Format::Jsonl => Vec::new(),
        }
    }

    /// One row, with exactly one cell per column.
    pub fn row(&mut self, cells: &[Cell]) -> Vec<u8> {
        debug_assert_eq!(cells.len(), self.columns.len());
        match self.format {
            Format::Csv => self.csv_record(cells.iter().map(Cell::text).collect::<Vec<_>>()),
            Format::Jsonl => {
                // Keys written in column order by hand: serde_json maps keep insertion order
                // only with a feature, and the file order must not depend on features.
                let mut line = Vec::with_capacity(64 * cells.len());
                line.push(b'{');
                for (i, (column, cell)) in self.columns.iter().zip(cells).enumerate() {
                    if i > 0 {
                        line.push(b',');
                    }
                    line.extend_from_slice(json_string(column).as_bytes());
                    line.push(b':');
                    line.extend_from_slice(cell.json().to_string().as_bytes());
                }
                line.extend_from_slice(b"}\n");
                line
            }
        }
    }

    fn csv_record<I, T>(&mut self, fields: I) -> Vec<u8>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        let mut writer = self.csv.from_writer(Vec::new());
        // Writing into a Vec cannot fail; an error would only mean a bug in the csv crate.
        if let Err(e) = writer.write_record(fields) {
            tracing::error!(error = %e, "csv encoding into memory failed");
        }
        writer
            .into_inner()
            .unwrap_or_else(|e| e.into_inner().get_ref().clone())
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// A piece of a file, at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub file_name: String,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What a finished file was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSummary {
    pub file_name: String,
    pub row_count: u64,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
}

/// One export file as it is produced: rows go in, chunks of at most [`MAX_CHUNK_BYTES`] come
/// out in order, and the hash covers every byte.
pub struct FileWriter {
    name: String,
    encoder: Encoder,
    hasher: Sha256,
    pending: Vec<u8>,
    /// Bytes already handed out as chunks.
    emitted: u64,
    rows: u64,
}

impl FileWriter {
    pub fn new(name: String, format: Format, columns: &[&'static str]) -> Self {
        let mut encoder = Encoder::new(format, columns);
        let header = encoder.header();
        let mut hasher = Sha256::new();
        hasher.update(&header);
        Self {
            name,
            encoder,
            hasher,
            pending: header,
            emitted: 0,
            rows: 0,
        }
    }

    pub fn push(&mut self, cells: &[Cell]) {
        let bytes = self.encoder.row(cells);
        self.hasher.update(&bytes);
        self.pending.extend_from_slice(&bytes);
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes produced so far.
    pub fn size(&self) -> u64 {
        self.emitted + self.pending.len() as u64
    }

    /// The full chunks ready to send.
    pub fn ready_chunks(&mut self) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        while self.pending.len() >= MAX_CHUNK_BYTES {
            let rest = self.pending.split_off(MAX_CHUNK_BYTES);
            let data = std::mem::replace(&mut self.pending, rest);
            chunks.push(self.chunk(data));
        }
        chunks
    }

    /// The last chunk (also sent, empty, for an empty file so that a reader of chunks alone
    /// still creates it) and the file's summary.
    pub fn finish(mut self) -> (Vec<Chunk>, FileSummary) {
        let mut chunks = self.ready_chunks();
        if !self.pending.is_empty() || self.emitted == 0 {
            let data = std::mem::take(&mut self.pending);
            chunks.push(self.chunk(data));
        }
        let digest = self.hasher.finalize();
        let summary = FileSummary {
            file_name: self.name,
            row_count: self.rows,
            size_bytes: self.emitted,
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        };
        (chunks, summary)
    }

    fn chunk(&mut self, data: Vec<u8>) -> Chunk {
        let offset = self.emitted;
        self.emitted += data.len() as u64;
        Chunk {
            file_name: self.name.clone(),
            offset,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(
        format: Format,
        columns: &[&'static str],
        rows: &[Vec<Cell>],
    ) -> (Vec<u8>, FileSummary) {
        let mut file = FileWriter::new("f".into(), format, columns);
        let mut bytes = Vec::new();
        for row in rows {
            file.push(row);
            for chunk in file.ready_chunks() {
                assert_eq!(chunk.offset, bytes.len() as u64);
                bytes.extend(chunk.data);
            }
        }
        let (chunks, summary) = file.finish();
        for chunk in chunks {
            assert!(chunk.data.len() <= MAX_CHUNK_BYTES);
            assert_eq!(chunk.offset, bytes.len() as u64);
            bytes.extend(chunk.data);
        }
        (bytes, summary)
    }

    #[test]
    fn csv_has_a_header_crlf_and_quotes_only_what_needs_it() {
        let (bytes, summary) = write(
            Format::Csv,
            &["id", "note", "amount", "tokens", "at"],
            &[vec![
                Cell::Text("a".into()),
                Cell::Text("say \"hi\", twice\r\n".into()),
                Cell::Amount("1.50".parse().unwrap()),
                Cell::Int(42),
                Cell::Time("2026-03-01T00:00:00Z".parse().unwrap()),
            ]],
        );

        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            "id,note,amount,tokens,at\r\na,\"say \"\"hi\"\", twice\r\n\",1.50,42,2026-03-01T00:00:00.000000Z\r\n"
        );
        assert_eq!(summary.row_count, 1);
        assert_eq!(summary.size_bytes, bytes.len() as u64);
        assert_eq!(
            summary.sha256,
            Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
    }

    #[test]
    fn jsonl_keeps_column_order_amounts_as_strings_and_counts_as_numbers() {
        let (bytes, _) = write(
            Format::Jsonl,
            &["z", "amount", "tokens", "gone"],
            &[vec![
                Cell::Text("x".into()),
                Cell::Amount("0.000480".parse().unwrap()),
                Cell::Int(7),
                Cell::Null,
            ]],
        );

        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\"z\":\"x\",\"amount\":\"0.000480\",\"tokens\":7,\"gone\":null}\n"
        );
    }

    #[test]
    fn big_files_are_cut_into_chunks_of_at_most_one_mebibyte_that_reassemble() {
        let row = vec![Cell::Text("x".repeat(1000))];
        let rows = vec![row; 3000];

        let (bytes, summary) = write(Format::Csv, &["c"], &rows);

        assert_eq!(summary.size_bytes, bytes.len() as u64);
        assert!(bytes.len() > 2 * MAX_CHUNK_BYTES);
        assert_eq!(summary.row_count, 3000);
    }

    #[test]
    fn an_empty_jsonl_file_is_still_one_empty_chunk() {
        let file = FileWriter::new("e.jsonl".into(), Format::Jsonl, &["a"]);
        let (chunks, summary) = file.finish();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].data.is_empty());
        assert_eq!(summary.size_bytes, 0);
    }

    proptest! {
        #[test]
        fn any_strings_survive_a_csv_round_trip(fields in proptest::collection::vec(any::<String>(), 1..6), rows in 0usize..4) {
            let columns: Vec<&'static str> = ["a", "b", "c", "d", "e", "f"][..fields.len()].to_vec();
            let row: Vec<Cell> = fields.iter().cloned().map(Cell::Text).collect();
            let (bytes, _) = write(Format::Csv, &columns, &vec![row; rows]);

            let mut reader = csv::ReaderBuilder::new().from_reader(bytes.as_slice());
            let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
            prop_assert_eq!(header, columns.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>());
            let mut seen = 0;
            for record in reader.records() {
                let record = record.unwrap();
                let got: Vec<String> = record.iter().map(str::to_owned).collect();
                prop_assert_eq!(&got, &fields);
                seen += 1;
            }
            prop_assert_eq!(seen, rows);
        }

        #[test]
        fn any_strings_survive_a_jsonl_round_trip(text in any::<String>(), n in any::<i64>()) {
            let (bytes, _) = write(Format::Jsonl, &["t", "n"], &[vec![Cell::Text(text.clone()), Cell::Int(n)]]);
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(value["t"].as_str(), Some(text.as_str()));
            prop_assert_eq!(value["n"].as_i64(), Some(n));
        }
    }
}
