//! Which (layer, expert) pairs a node hosts, as operators write it on the command line.
//!
//! ```text
//! all                                  every routed expert of every MoE layer
//! none                                 nothing yet (experts arrive through LoadExperts)
//! 0-31                                 experts 0..=31 of every MoE layer
//! 0-7,16,24-31                         lists of ranges
//! layers=0-7:experts=0-63              experts 0..=63 of layers 0..=7 (either part may be left out or be `all`)
//! layers=0-3;layers=4-7:experts=0-15   clauses separated by `;` add up
//! ```

use std::fmt;

/// A parsed `--experts` value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExpertSpec {
    clauses: Vec<Clause>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    /// `None` is every layer.
    layers: Option<Vec<(u32, u32)>>,
    /// `None` is every expert.
    experts: Option<Vec<(u32, u32)>>,
}

/// A `--experts` value that does not parse or does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid expert set {text:?}: {message}")]
pub struct SpecError {
    pub text: String,
    pub message: String,
}

impl ExpertSpec {
    pub fn all() -> Self {
        ExpertSpec { clauses: vec![Clause { layers: None, experts: None }], text: "all".into() }
    }

    pub fn none() -> Self {
        ExpertSpec { clauses: Vec::new(), text: "none".into() }
    }

    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let err = |message: String| SpecError { text: text.to_owned(), message };
        let trimmed = text.trim();
        match trimmed {
            "" => return Err(err("empty (use `all` or `none`)".into())),
            "all" => return Ok(Self::all()),
            "none" => return Ok(Self::none()),
            _ => {}
        }
        let mut clauses = Vec::new();
        for clause in trimmed.split(';').map(str::trim) {
            if clause.is_empty() {
                return Err(err("empty clause between `;`".into()));
            }
            if !clause.contains('=') {
                clauses.push(Clause { layers: None, experts: ranges(clause).map_err(err)? });
                continue;
            }
            let (mut layers, mut experts) = (None, None);
            for part in clause.split(':').map(str::trim) {
                let (key, value) =
                    part.split_once('=').ok_or_else(|| err(format!("`{part}` is not `layers=…` or `experts=…`")))?;
                let slot = match key.trim() {
                    "layers" => &mut layers,
                    "experts" => &mut experts,
                    other => return Err(err(format!("unknown key `{other}` (expected `layers` or `experts`)"))),
                };
                if slot.is_some() {
                    return Err(err(format!("`{}` given twice in one clause", key.trim())));
                }
                *slot = Some(ranges(value).map_err(err)?);
            }
            clauses.push(Clause { layers: layers.flatten(), experts: experts.flatten() });
        }
        Ok(ExpertSpec { clauses, text: trimmed.to_owned() })
    }

    /// Checks that every layer and expert named exists in a model of `num_layers` layers and `num_experts` experts.
    pub fn validate(&self, num_layers: usize, num_experts: usize) -> Result<(), SpecError> {
        for clause in &self.clauses {
            for (what, ranges, limit) in
                [("layer", &clause.layers, num_layers), ("expert", &clause.experts, num_experts)]
            {
                if let Some(&(_, hi)) = ranges.iter().flatten().find(|&&(_, hi)| hi as usize >= limit) {
                    return Err(SpecError {
                        text: self.text.clone(),
                        message: format!("{what} {hi} does not exist (the model has {limit}: 0-{})", limit - 1),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn contains(&self, layer: usize, expert: usize) -> bool {
        let inside = |ranges: &Option<Vec<(u32, u32)>>, v: usize| {
            ranges.as_ref().is_none_or(|r| r.iter().any(|&(lo, hi)| (lo as usize..=hi as usize).contains(&v)))
        };
        self.clauses.iter().any(|c| inside(&c.layers, layer) && inside(&c.experts, expert))
    }
}

impl fmt::Display for ExpertSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<ExpertSpec> for String {
    fn from(spec: ExpertSpec) -> String {
        spec.to_string()
    }
}

impl TryFrom<String> for ExpertSpec {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        s.parse()
    }
}

impl std::str::FromStr for ExpertSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        Self::parse(s)
    }
}

/// Parses `all` (→ `None`) or a comma list of `n` and `lo-hi`.
fn ranges(text: &str) -> Result<Option<Vec<(u32, u32)>>, String> {
    let text = text.trim();
    if text == "all" {
        return Ok(None);
    }
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("`{}` is not a number", s.trim()));
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        if item.is_empty() {
            return Err("empty item in a list".into());
        }
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (number(lo)?, number(hi)?),
            None => (number(item)?, number(item)?),
        };
        if lo > hi {
            return Err(format!("range `{item}` is backwards"));
        }
        out.push((lo, hi));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(spec: &str, layers: usize, experts: usize) -> Vec<(usize, usize)> {
        let s = ExpertSpec::parse(spec).expect(spec);
        s.validate(layers, experts).expect(spec);
        (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).filter(|&(l, e)| s.contains(l, e)).collect()
    }

    #[test]
    fn forms() {
        assert_eq!(set("all", 2, 3).len(), 6);
        assert!(set("none", 2, 3).is_empty());
        assert_eq!(set("0-1", 2, 4), vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(set("0,3", 1, 4), vec![(0, 0), (0, 3)]);
        assert_eq!(set("layers=1:experts=2-3", 2, 4), vec![(1, 2), (1, 3)]);
        assert_eq!(set("layers=1", 2, 2), vec![(1, 0), (1, 1)]);
        assert_eq!(set("experts=1", 2, 2), vec![(0, 1), (1, 1)]);
        assert_eq!(set("layers=0:experts=0;layers=1:experts=all", 2, 2), vec![(0, 0), (1, 0), (1, 1)]);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = |s: &str| ExpertSpec::parse(s).expect_err(s).to_string();
        assert!(msg("").contains("empty"));
        assert!(msg("3-1").contains("backwards"));
        assert!(msg("x").contains("not a number"));
        assert!(msg("layer=1").contains("unknown key `layer`"));
        assert!(msg("layers=1:layers=2").contains("twice"));
        assert!(msg("0-3;").contains("empty clause"));
        let e = ExpertSpec::parse("0-64").expect("parses").validate(2, 64).expect_err("too many");
        assert!(e.to_string().contains("expert 64 does not exist"), "{e}");
        let e = ExpertSpec::parse("layers=2").expect("parses").validate(2, 64).expect_err("no layer 2");
        assert!(e.to_string().contains("layer 2 does not exist"), "{e}");
    }
}
