//! The recognition catalog: which `dataCode`s exist, of which report type, and how many
//! days a result stays recognisable. Loaded from CSV (`dataCode,type,name,validityDays`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use hmr_protocol::ReportType;
use serde::Deserialize;

use crate::error::SimError;

#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub data_code: String,
    pub report_type: ReportType,
    pub name: String,
    pub validity_days: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<String, CatalogEntry>,
}

/// One CSV row; the header names are the catalog file's, not the platform's wire names.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    data_code: String,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    validity_days: u32,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog, SimError> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| SimError::Catalog {
            origin: origin.clone(),
            reason: e.to_string(),
        })?;
        Catalog::from_reader(file, &origin)
    }

    pub fn from_csv(text: &str) -> Result<Catalog, SimError> {
        Catalog::from_reader(text.as_bytes(), "inline")
    }

    pub fn from_reader<R: Read>(reader: R, origin: &str) -> Result<Catalog, SimError> {
        let fail = |reason: String| SimError::Catalog {
            origin: origin.to_owned(),
            reason,
        };
        let mut csv = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(reader);
        let mut entries = BTreeMap::new();
        for (line, row) in csv.deserialize::<Row>().enumerate() {
            let row = row.map_err(|e| fail(e.to_string()))?;
            let report_type = ReportType::parse(&row.kind)
                .ok_or_else(|| fail(format!("row {}: type `{}` is not lab or exam", line + 1, row.kind)))?;
            if row.data_code.is_empty() || row.validity_days == 0 {
                return Err(fail(format!("row {}: empty code or zero validity", line + 1)));
            }
            let entry = CatalogEntry {
                data_code: row.data_code.clone(),
                report_type,
                name: row.name,
                validity_days: row.validity_days,
            };
            if entries.insert(row.data_code.clone(), entry).is_some() {
                return Err(fail(format!("dataCode {} listed twice", row.data_code)));
            }
        }
        if entries.is_empty() {
            return Err(fail("no entries".into()));
        }
        Ok(Catalog { entries })
    }

    pub fn get(&self, data_code: &str) -> Option<&CatalogEntry> {
        self.entries.get(data_code)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Why `data_code` cannot be used for a report of `kind`, as a field-error reason.
    pub fn problem(&self, data_code: &str, kind: ReportType) -> Option<&'static str> {
        match self.get(data_code) {
            None => Some("not-in-catalog"),
            Some(e) if e.report_type != kind => Some("wrong-type"),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c =
            Catalog::from_csv("dataCode,type,name,validityDays\nJY0001,lab,血常规,7\nJC0001, exam ,头颅CT平扫,30\n")
                .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("JC0001").unwrap().report_type, ReportType::Exam);
        assert_eq!(c.problem("JY0001", ReportType::Exam), Some("wrong-type"));
        assert_eq!(c.problem("XX", ReportType::Lab), Some("not-in-catalog"));
        assert!(Catalog::from_csv("dataCode,type,name,validityDays\nA,lab,x,7\nA,lab,y,7\n").is_err());
        assert!(Catalog::from_csv("dataCode,type,name,validityDays\nA,blood,x,7\n").is_err());
    }

    #[test]
    fn loads_the_shared_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/catalog-sample.csv");
        if path.exists() {
            let c = Catalog::load(&path).unwrap();
            assert_eq!(c.get("JY0001").unwrap().name, "血常规");
        }
    }
}
