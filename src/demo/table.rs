//! Plain aligned text tables for terminal output: a header, a rule, rows; columns two spaces
//! apart, text left-aligned and figures right-aligned.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn cell(&self, row: &[String], column: usize) -> String {
        row.get(column).cloned().unwrap_or_default()
    }

    fn widths(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (title, _))| {
                self.rows
                    .iter()
                    .map(|r| self.cell(r, i).chars().count())
                    .chain([title.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn write_line(
        &self,
        f: &mut fmt::Formatter<'_>,
        widths: &[usize],
        cells: impl Iterator<Item = String>,
    ) -> fmt::Result {
        let mut line = String::new();
        for (i, (cell, (width, (_, align)))) in
            cells.zip(widths.iter().zip(&self.columns)).enumerate()
        {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            match align {
                Align::Left => {
                    line.push_str(&cell);
                    line.push_str(&pad);
                }
                Align::Right => {
                    line.push_str(&pad);
                    line.push_str(&cell);
                }
            }
        }
        writeln!(f, "{}", line.trim_end())
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        self.write_line(
            f,
            &widths,
            self.columns.iter().map(|(title, _)| (*title).to_owned()),
        )?;
        self.write_line(f, &widths, widths.iter().map(|w| "-".repeat(*w)))?;
        for row in &self.rows {
            self.write_line(
                f,
                &widths,
                (0..self.columns.len()).map(|i| self.cell(row, i)),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_their_widest_cell() {
        let mut table = Table::new(&[("name", Align::Left), ("amount", Align::Right)]);
        table.row(vec!["espresso".into(), "2.50".into()]);
        table.row(vec!["tea".into(), "12.00".into()]);

        assert_eq!(
            table.to_string(),
            "name      amount\n--------  ------\nespresso    2.50\ntea        12.00\n"
        );
    }

    #[test]
    fn a_short_row_leaves_its_missing_cells_blank() {
        let mut table = Table::new(&[("a", Align::Left), ("b", Align::Right)]);
        table.row(vec!["x".into()]);

        assert_eq!(table.to_string(), "a  b\n-  -\nx\n");
    }
}
