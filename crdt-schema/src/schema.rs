//! Field schemas per collection, and the check of a record against its schema.
//!
//! A schema lists the fields a collection knows, their types and whether they are required.
//! The same check runs on a local write before any change exists and, once the policy
//! carries schemas, inside the verdict on every remote change.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::record::{FieldValue, check_field_name};

/// The type a schema gives a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum FieldType {
    /// [`FieldValue::Str`].
    String,
    /// [`FieldValue::Int`].
    Integer,
    /// [`FieldValue::Float`]; integers are accepted too.
    Float,
    /// [`FieldValue::Bool`].
    Bool,
    /// [`FieldValue::Timestamp`].
    Timestamp,
    /// [`FieldValue::Text`].
    Text,
    /// [`FieldValue::List`].
    List,
    /// [`FieldValue::Counter`]: concurrent increments add up.
    Counter,
    /// [`FieldValue::Ref`], optionally only to records of one collection.
    Reference {
        /// The collection the reference must point into, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        collection: Option<String>,
    },
}

/// One field of a schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSchema {
    /// The field's type.
    #[serde(flatten)]
    pub field_type: FieldType,
    /// Whether every live record must have the field. Default: false.
    #[serde(default)]
    pub required: bool,
}

/// The schema of one collection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionSchema {
    /// The known fields.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSchema>,
    /// Whether fields that the schema does not list are allowed. Default: false, so a
    /// typo in a field name is caught.
    #[serde(default)]
    pub allow_other_fields: bool,
}

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaProblem {
    /// A required field is absent.
    Missing,
    /// The value has another type than the schema says.
    WrongType {
        /// The schema's type.
        expected: String,
        /// The value's type.
        found: &'static str,
    },
    /// A reference points into another collection than the schema allows.
    WrongCollection {
        /// The collection the schema requires.
        expected: String,
        /// The collection the reference names.
        found: String,
    },
    /// The schema does not list the field and does not allow other fields.
    Unknown,
}

/// One field that breaks the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {problem}")]
pub struct SchemaError {
    /// The field's name.
    pub field: String,
    /// What is wrong.
    pub problem: SchemaProblem,
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaProblem::Missing => f.write_str("is required but missing"),
            SchemaProblem::WrongType { expected, found } => {
                write!(f, "must be {expected} but is {found}")
            }
            SchemaProblem::WrongCollection { expected, found } => write!(
                f,
                "must refer to a record in `{expected}` but refers to `{found}`"
            ),
            SchemaProblem::Unknown => {
                f.write_str("is not in the collection's schema (allow_other_fields is off)")
            }
        }
    }
}

impl FieldType {
    fn name(&self) -> String {
        match self {
            FieldType::String => "string".into(),
            FieldType::Integer => "integer".into(),
            FieldType::Float => "float".into(),
            FieldType::Bool => "bool".into(),
            FieldType::Timestamp => "timestamp".into(),
            FieldType::Text => "text".into(),
            FieldType::List => "list".into(),
            FieldType::Counter => "counter".into(),
            FieldType::Reference { collection: None } => "reference".into(),
            FieldType::Reference {
                collection: Some(collection),
            } => format!("reference to `{collection}`"),
        }
    }

    fn check(&self, value: &FieldValue) -> Result<(), SchemaProblem> {
        let matches = matches!(
            (self, value),
            (FieldType::String, FieldValue::Str(_))
                | (FieldType::Integer, FieldValue::Int(_))
                | (FieldType::Float, FieldValue::Float(_) | FieldValue::Int(_))
                | (FieldType::Bool, FieldValue::Bool(_))
                | (FieldType::Timestamp, FieldValue::Timestamp(_))
                | (FieldType::Text, FieldValue::Text(_))
                | (FieldType::Counter, FieldValue::Counter(_))
                | (FieldType::List, FieldValue::List(_))
                | (FieldType::Reference { .. }, FieldValue::Ref(_))
        );
        if !matches {
            return Err(SchemaProblem::WrongType {
                expected: self.name(),
                found: value.type_name(),
            });
        }
        if let (
            FieldType::Reference {
                collection: Some(expected),
            },
            FieldValue::Ref(target),
        ) = (self, value)
            && target.collection() != expected
        {
            return Err(SchemaProblem::WrongCollection {
                expected: expected.clone(),
                found: target.collection().to_owned(),
            });
        }
        Ok(())
    }
}

impl CollectionSchema {
    /// Checks a record's fields. A deleted record need not carry its required fields.
    /// Returns every problem, not only the first, sorted by field name.
    pub fn check(
        &self,
        fields: &BTreeMap<String, FieldValue>,
        deleted: bool,
    ) -> Result<(), Vec<SchemaError>> {
        let mut errors = Vec::new();
        for (name, value) in fields {
            let problem = match self.fields.get(name) {
                Some(schema) => schema.field_type.check(value).err(),
                None if self.allow_other_fields => None,
                None => Some(SchemaProblem::Unknown),
            };
            if let Some(problem) = problem {
                errors.push(SchemaError {
                    field: name.clone(),
                    problem,
                });
            }
        }
        if !deleted {
            for (name, schema) in &self.fields {
                if schema.required && !fields.contains_key(name) {
                    errors.push(SchemaError {
                        field: name.clone(),
                        problem: SchemaProblem::Missing,
                    });
                }
            }
        }
        errors.sort_by(|a, b| a.field.cmp(&b.field));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Checks that the schema's own field names are valid.
    pub fn validate(&self) -> Result<(), crate::record::NameError> {
        self.fields
            .keys()
            .try_for_each(|name| check_field_name(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordId;

    fn schema() -> CollectionSchema {
        let mut fields = BTreeMap::new();
        fields.insert(
            "name".to_owned(),
            FieldSchema {
                field_type: FieldType::String,
                required: true,
            },
        );
        fields.insert(
            "price".to_owned(),
            FieldSchema {
                field_type: FieldType::Float,
                required: false,
            },
        );
        fields.insert(
            "item".to_owned(),
            FieldSchema {
                field_type: FieldType::Reference {
                    collection: Some("catalogue".into()),
                },
                required: false,
            },
        );
        CollectionSchema {
            fields,
            allow_other_fields: false,
        }
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let mut fields = BTreeMap::new();
        fields.insert("price".to_owned(), FieldValue::Str("cheap".into()));
        fields.insert("colour".to_owned(), FieldValue::Str("red".into()));
        fields.insert(
            "item".to_owned(),
            FieldValue::Ref(RecordId::new("stock", "1").unwrap()),
        );
        let errors = schema().check(&fields, false).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "field `colour` is not in the collection's schema (allow_other_fields is off)",
                "field `item` must refer to a record in `catalogue` but refers to `stock`",
                "field `name` is required but missing",
                "field `price` must be float but is string",
            ]
        );
    }

    #[test]
    fn a_valid_record_passes_and_integers_count_as_floats() {
        let mut fields = BTreeMap::new();
        fields.insert("name".to_owned(), FieldValue::Str("Aspirin".into()));
        fields.insert("price".to_owned(), FieldValue::Int(3));
        assert_eq!(schema().check(&fields, false), Ok(()));
        assert_eq!(
            schema().check(&BTreeMap::new(), true),
            Ok(()),
            "deleted records need nothing"
        );
    }

    #[test]
    fn a_counter_field_takes_only_a_counter() {
        let schema: CollectionSchema =
            serde_json::from_value(serde_json::json!({"fields": {"on_hand": {"type": "counter"}}}))
                .unwrap();
        let with = |value| BTreeMap::from([("on_hand".to_owned(), value)]);
        assert_eq!(schema.check(&with(FieldValue::Counter(3)), false), Ok(()));
        let errors = schema.check(&with(FieldValue::Int(3)), false).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "field `on_hand` must be counter but is integer"
        );
    }
}
