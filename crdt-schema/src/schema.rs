//! Field schemas per collection, and the check of a record against its schema.
//!
//! A schema lists the fields a collection knows, their types and whether they are required.
//! The same check runs on a local write before any change exists and, once the policy
//! carries schemas, inside the verdict on every remote change.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::decimal::Decimal;
use crate::record::{Edit, FieldEdit, FieldValue, check_field_name};

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
    /// [`FieldValue::Decimal`]: exact; a local write's integers, and floats of at most 15
    /// significant digits, are taken as the decimal they stand for.
    Decimal,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// A decimal field was given a float that may not be the decimal meant.
    Inexact {
        /// The float given.
        float: f64,
    },
}

/// One field that breaks the schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
            SchemaProblem::Inexact { float } => write!(
                f,
                "is a decimal, and the number {float} may be a rounding: send it as {{\"$decimal\": \"...\"}} with the digits meant"
            ),
        }
    }
}

impl CollectionSchema {
    /// The values of a local write taken as the type the schema gives their field, where
    /// that is exact: an integer or a float of at most 15 significant digits for a decimal
    /// field becomes that decimal (a JSON number cannot say "decimal"). A float that may be
    /// a rounding is refused, so the write names the decimal exactly instead.
    pub fn coerce(&self, edit: &mut Edit) -> Result<(), SchemaError> {
        let Edit::Put(fields) = edit else {
            return Ok(());
        };
        for (name, update) in fields.iter_mut() {
            let FieldEdit::Set(value) = update else {
                continue;
            };
            let Some(FieldSchema { field_type, .. }) = self.fields.get(name) else {
                continue;
            };
            if *field_type == FieldType::Float
                && let FieldValue::Decimal(decimal) = value
                && let Ok(float) = decimal.as_str().parse::<f64>()
                && Decimal::parse(&format!("{float:e}")).as_ref() == Ok(&*decimal)
            {
                // A float field takes a decimal that a float holds exactly.
                *value = FieldValue::Float(float);
                continue;
            }
            if *field_type != FieldType::Decimal {
                continue;
            }
            match value {
                FieldValue::Int(integer) => {
                    *value = FieldValue::Decimal(Decimal::from_integer(*integer))
                }
                FieldValue::Float(float) => match Decimal::from_float(*float) {
                    Some(decimal) => *value = FieldValue::Decimal(decimal),
                    None => {
                        return Err(SchemaError {
                            field: name.clone(),
                            problem: SchemaProblem::Inexact { float: *float },
                        });
                    }
                },
                _ => {}
            }
        }
        Ok(())
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
            FieldType::Decimal => "decimal".into(),
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
                | (FieldType::Decimal, FieldValue::Decimal(_))
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
    fn numbers_for_a_decimal_field_become_that_decimal_when_exact() {
        let schema: CollectionSchema = serde_json::from_value(serde_json::json!({
            "fields": {"price": {"type": "decimal"}, "weight": {"type": "float"}}
        }))
        .unwrap();
        let coerced = |value: FieldValue| {
            let mut edit = Edit::Put(BTreeMap::from([(
                "price".to_owned(),
                FieldEdit::Set(value),
            )]));
            schema.coerce(&mut edit).map(|()| edit)
        };
        let decimal = |text| {
            Edit::Put(BTreeMap::from([(
                "price".to_owned(),
                FieldEdit::Set(FieldValue::Decimal(Decimal::parse(text).unwrap())),
            )]))
        };
        assert_eq!(coerced(FieldValue::Float(12.5)).unwrap(), decimal("12.5"));
        assert_eq!(coerced(FieldValue::Int(3)).unwrap(), decimal("3"));
        let error = coerced(FieldValue::Float(0.1 + 0.2))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("$decimal") && error.contains("price"),
            "{error}"
        );
        let mut weight = Edit::Put(BTreeMap::from([(
            "weight".to_owned(),
            FieldEdit::Set(FieldValue::Decimal(
                Decimal::parse("0.30000000000000004").unwrap(),
            )),
        )]));
        schema.coerce(&mut weight).unwrap();
        let Edit::Put(fields) = weight else {
            unreachable!()
        };
        assert_eq!(
            fields["weight"],
            FieldEdit::Set(FieldValue::Float(0.1 + 0.2))
        );
        let string_schema: CollectionSchema =
            serde_json::from_value(serde_json::json!({"fields": {"code": {"type": "string"}}}))
                .unwrap();
        let mut code = Edit::Put(BTreeMap::from([(
            "code".to_owned(),
            FieldEdit::Set(FieldValue::Str("1e5".into())),
        )]));
        string_schema.coerce(&mut code).unwrap();
        let Edit::Put(fields) = code else {
            unreachable!()
        };
        assert_eq!(
            fields["code"],
            FieldEdit::Set(FieldValue::Str("1e5".into())),
            "stays a string"
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
