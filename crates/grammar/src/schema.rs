//! JSON Schema (a draft 2020-12 subset) → grammar rules.
//!
//! Contract: the grammar derives only documents that validate against the schema; where the
//! schema allows more than the grammar offers, the grammar is the stricter one (the public list is
//! on [`Grammar::json_schema`]), never the looser. A keyword this module cannot enforce is an error
//! naming it and its path, never ignored. Each schema compiles to one rule named by its JSON
//! pointer, so errors found later (left recursion, no finite document) can name the schema too.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::grammar::{lit, Grammar, RuleId, Seq, Sym};
use crate::json::Json;
use crate::numbers::{integer_range, max_magnitude, number_range};
use crate::GrammarError;

/// Keywords that never constrain and are ignored.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$anchor",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "nullable",
    "discriminator",
];

/// Keywords this module enforces.
const ENFORCED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "format",
];

const OBJECT_KEYWORDS: &[&str] = &["properties", "required", "additionalProperties"];
const ARRAY_KEYWORDS: &[&str] = &[
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
];
const STRING_KEYWORDS: &[&str] = &["minLength", "maxLength", "format"];
const NUMBER_KEYWORDS: &[&str] = &["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];
const TYPES: &[&str] = &[
    "string", "number", "integer", "boolean", "null", "object", "array",
];

/// Largest `minItems`/`maxItems`/`minLength`/`maxLength` accepted: each unit of a bound costs
/// grammar rules.
pub(crate) const MAX_BOUND: u64 = 100_000;

fn is_annotation(keyword: &str) -> bool {
    ANNOTATIONS.contains(&keyword) || keyword.starts_with("x-")
}

/// Escapes a key for a JSON pointer (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl Grammar {
    /// Compiles a JSON Schema (a draft 2020-12 subset) into a grammar of documents that satisfy it.
    /// An empty schema `{}` or `true` means any JSON value. Errors name the keyword and the JSON
    /// pointer (`#/properties/x`) of the schema at fault.
    ///
    /// Supported: `type` (one or a list), `enum`, `const`, `properties`, `required`,
    /// `additionalProperties` (absent/`true`: other keys may follow the declared ones with any
    /// value; `false`: none; a schema: other keys follow it), `items`, `prefixItems` (and the
    /// draft-07 array form of `items` with `additionalItems`), `minItems`, `maxItems`, `minLength`,
    /// `maxLength` (each at most 100,000),
    /// `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` (integers: any bound; numbers:
    /// inclusive integer bounds, and the number is then written without exponent), `anyOf`,
    /// `oneOf`, `allOf` with one entry, `$ref` to any local JSON pointer (`#`, `#/$defs/..`,
    /// `#/definitions/..`; recursion works), `format` `date`, `time`, `date-time`, `uuid` (any
    /// other format fails as keyword `format: <name>`).
    ///
    /// Ignored: `title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`,
    /// `$anchor`, `deprecated`, `readOnly`, `writeOnly`, `nullable` and `discriminator` (OpenAPI),
    /// `$defs`, `definitions`, `uniqueItems: false`, and any `x-...` extension. `nullable: true` is
    /// ignored because JSON Schema ignores it: write `"type": ["string", "null"]` to allow null.
    /// `format` on a non-string type constrains nothing (it applies to strings only).
    ///
    /// Where the grammar is stricter than the schema:
    /// - properties appear in the order of the schema's `properties` map (the order
    ///   `serde_json::Map` iterates: declaration order when serde_json's `preserve_order` feature
    ///   is on, alphabetical otherwise), required ones always, optional ones or not; additional
    ///   keys come after them, are written without backslash escapes, and are never one of the
    ///   declared keys;
    /// - `oneOf` is compiled as `anyOf`: a document matching two branches is not excluded (use
    ///   branches that exclude each other, e.g. by a `const` tag, as schemas usually do);
    /// - with no `type`, the type is inferred from the keywords present (`properties` → object,
    ///   `items` → array, `minLength` → string, `minimum` → number ...), or any JSON value if none;
    /// - `enum`/`const` values are written exactly as `serde_json` prints them (compact);
    /// - numbers have at most 15 integer digits, 15 fraction digits and a 2-digit exponent, and
    ///   whitespace between tokens is bounded (see the crate documentation);
    /// - `time` and `date-time` have no leap second (`:60`).
    pub fn json_schema(schema: &Value) -> Result<Grammar, GrammarError> {
        let mut json = Json::default();
        let root = SchemaCompiler::new(&mut json, schema, String::new()).compile_root()?;
        json.b.finish(root)
    }

    /// Any JSON object (OpenAI's `json_object` mode, Ollama's `format: "json"`).
    pub fn json_object() -> Grammar {
        let mut json = Json::default();
        match json.object_any().and_then(|root| json.b.finish(root)) {
            Ok(g) => g,
            // The rules are fixed and small; `json_object_builds` tests this never happens.
            Err(e) => unreachable!("the built-in JSON object grammar does not build: {e}"),
        }
    }
}

/// Compiles one schema document; `$ref`s resolve against that document.
pub(crate) struct SchemaCompiler<'a> {
    j: &'a mut Json,
    doc: &'a Value,
    /// Put before `#` in paths, to say which document a path is in (e.g. which tool's parameters).
    prefix: String,
    /// Rule of each `$ref` target already compiled (or being compiled), by JSON pointer.
    refs: HashMap<String, RuleId>,
    /// Schemas being compiled right now (nesting plus `$ref` chains), against [`MAX_DEPTH`].
    depth: usize,
}

/// Deepest nesting of schemas (through `$ref`s too) compiled; keeps recursion off the stack
/// limit of a server thread.
pub(crate) const MAX_DEPTH: usize = 200;

impl<'a> SchemaCompiler<'a> {
    pub fn new(j: &'a mut Json, doc: &'a Value, prefix: String) -> Self {
        SchemaCompiler {
            j,
            doc,
            prefix,
            refs: HashMap::new(),
            depth: 0,
        }
    }

    pub fn compile_root(&mut self) -> Result<RuleId, GrammarError> {
        let doc = self.doc;
        self.compile(doc, "")
    }

    fn path(&self, ptr: &str) -> String {
        format!("{}#{ptr}", self.prefix)
    }

    fn invalid(&self, ptr: &str, message: impl Into<String>) -> GrammarError {
        GrammarError::InvalidSchema {
            path: self.path(ptr),
            message: message.into(),
        }
    }

    fn unsupported(&self, ptr: &str, keyword: &str) -> GrammarError {
        GrammarError::Unsupported {
            keyword: keyword.into(),
            path: self.path(ptr),
        }
    }

    /// Errors on the first keyword of `obj` that is neither an annotation nor in `allowed`.
    fn only(
        &self,
        obj: &Map<String, Value>,
        ptr: &str,
        allowed: &[&str],
        with: &str,
    ) -> Result<(), GrammarError> {
        let vacuous = |k: &str| k == "uniqueItems" && obj[k] == Value::Bool(false);
        match obj
            .keys()
            .find(|k| !is_annotation(k) && !allowed.contains(&k.as_str()) && !vacuous(k))
        {
            Some(k) => Err(GrammarError::Combination {
                keyword: k.clone(),
                with: with.into(),
                path: self.path(ptr),
            }),
            None => Ok(()),
        }
    }

    /// The rule for the schema at JSON pointer `ptr` (relative to the document).
    pub fn compile(&mut self, schema: &'a Value, ptr: &str) -> Result<RuleId, GrammarError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.invalid(
                ptr,
                format!(
                    "schemas nest (or $ref chains run) deeper than {MAX_DEPTH} levels; \
                     flatten the schema"
                ),
            ));
        }
        self.depth += 1;
        let rule = self.compile_at_depth(schema, ptr);
        self.depth -= 1;
        rule
    }

    fn compile_at_depth(&mut self, schema: &'a Value, ptr: &str) -> Result<RuleId, GrammarError> {
        let obj = match schema {
            Value::Bool(true) => return self.j.value(),
            Value::Bool(false) => {
                return Err(self.invalid(
                    ptr,
                    "the schema `false` matches nothing; remove the part that requires it",
                ))
            }
            Value::Object(obj) => obj,
            _ => return Err(self.invalid(ptr, "a schema must be an object or a boolean")),
        };
        // `uniqueItems: false` constrains nothing.
        let vacuous = |k: &str| k == "uniqueItems" && obj[k] == Value::Bool(false);
        if let Some(k) = obj
            .keys()
            .find(|k| !is_annotation(k) && !ENFORCED.contains(&k.as_str()) && !vacuous(k))
        {
            return Err(self.unsupported(ptr, k));
        }
        if obj.contains_key("$ref") {
            self.only(obj, ptr, &["$ref"], "$ref")?;
            return self.reference(obj, ptr);
        }
        let combinators: Vec<&str> = ["anyOf", "oneOf", "allOf"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        if let Some(&kw) = combinators.first() {
            self.only(obj, ptr, &[kw], kw)?;
            return self.combinator(obj, kw, ptr);
        }
        if obj.contains_key("enum") || obj.contains_key("const") {
            return self.enumeration(obj, ptr);
        }
        self.typed(obj, ptr)
    }

    fn reference(
        &mut self,
        obj: &'a Map<String, Value>,
        ptr: &str,
    ) -> Result<RuleId, GrammarError> {
        let Some(target) = obj["$ref"].as_str() else {
            return Err(self.invalid(ptr, "\"$ref\" must be a string like \"#/$defs/Name\""));
        };
        let Some(pointer) = target.strip_prefix('#') else {
            return Err(self.invalid(
                ptr,
                format!(
                    "\"$ref\": \"{target}\" points outside this schema; only local references \
                     (\"#/$defs/Name\") are supported: inline the referenced schema"
                ),
            ));
        };
        if let Some(&rule) = self.refs.get(pointer) {
            return Ok(rule);
        }
        let doc = self.doc;
        let Some(schema) = doc.pointer(pointer) else {
            return Err(self.invalid(
                ptr,
                format!("\"$ref\": \"{target}\" does not resolve to anything in this schema"),
            ));
        };
        let rule = self.j.b.reserve(self.path(pointer));
        self.refs.insert(pointer.to_string(), rule);
        let inner = self.compile(schema, pointer)?;
        self.j.b.define(rule, vec![vec![Sym::Rule(inner)]])?;
        Ok(rule)
    }

    fn combinator(
        &mut self,
        obj: &'a Map<String, Value>,
        kw: &str,
        ptr: &str,
    ) -> Result<RuleId, GrammarError> {
        let Some(branches) = obj[kw].as_array().filter(|a| !a.is_empty()) else {
            return Err(self.invalid(
                ptr,
                format!("\"{kw}\" must be a non-empty array of schemas"),
            ));
        };
        if kw == "allOf" && branches.len() > 1 {
            // Intersecting grammars is not something a CFG can do in general.
            return Err(self.unsupported(ptr, "allOf"));
        }
        let mut alts = Vec::new();
        for (i, branch) in branches.iter().enumerate() {
            if branch == &Value::Bool(false) {
                continue; // matches nothing: contributes no alternative
            }
            alts.push(vec![Sym::Rule(
                self.compile(branch, &format!("{ptr}/{kw}/{i}"))?,
            )]);
        }
        self.alternatives(ptr, alts)
    }

    /// A rule of `alts`, or the one rule itself when there is a single one.
    fn alternatives(&mut self, ptr: &str, alts: Vec<Seq>) -> Result<RuleId, GrammarError> {
        match alts.as_slice() {
            [] => Err(self.invalid(
                ptr,
                "no value can satisfy this schema (every alternative is excluded)",
            )),
            [only] => match only.as_slice() {
                [Sym::Rule(r)] => Ok(*r),
                _ => self.j.b.rule(self.path(ptr), alts),
            },
            _ => self.j.b.rule(self.path(ptr), alts),
        }
    }

    fn enumeration(
        &mut self,
        obj: &'a Map<String, Value>,
        ptr: &str,
    ) -> Result<RuleId, GrammarError> {
        self.only(
            obj,
            ptr,
            &["enum", "const", "type"],
            if obj.contains_key("enum") {
                "enum"
            } else {
                "const"
            },
        )?;
        let mut values: Vec<&Value> = match obj.get("enum") {
            Some(Value::Array(values)) if !values.is_empty() => values.iter().collect(),
            Some(_) => return Err(self.invalid(ptr, "\"enum\" must be a non-empty array")),
            None => Vec::new(),
        };
        if let Some(c) = obj.get("const") {
            if obj.contains_key("enum") {
                values.retain(|v| *v == c);
            } else {
                values.push(c);
            }
        }
        if let Some(types) = obj.get("type") {
            let types = self.type_list(types, ptr)?;
            values.retain(|v| types.iter().any(|t| has_type(v, t)));
        }
        if values.is_empty() {
            return Err(self.invalid(
                ptr,
                "no value of \"enum\"/\"const\" has the declared \"type\" (or \"const\" is not \
                 in \"enum\"); fix the values or the type",
            ));
        }
        let alts = values.into_iter().map(|v| self.j.literal(v)).collect();
        self.j.b.rule(self.path(ptr), alts)
    }

    fn type_list(&self, types: &Value, ptr: &str) -> Result<Vec<&'static str>, GrammarError> {
        let names: Vec<&str> = match types {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|t| {
                    t.as_str().ok_or_else(|| {
                        self.invalid(ptr, "\"type\" must be a string or an array of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(self.invalid(
                    ptr,
                    "\"type\" must be a string or a non-empty array of strings",
                ))
            }
        };
        names
            .into_iter()
            .map(|n| {
                TYPES.iter().copied().find(|t| *t == n).ok_or_else(|| {
                    self.invalid(
                        ptr,
                        format!("unknown type \"{n}\"; use one of {}", TYPES.join(", ")),
                    )
                })
            })
            .collect()
    }

    fn typed(&mut self, obj: &'a Map<String, Value>, ptr: &str) -> Result<RuleId, GrammarError> {
        let types = match obj.get("type") {
            Some(t) => self.type_list(t, ptr)?,
            None => {
                let has = |kws: &[&str]| kws.iter().any(|k| obj.contains_key(*k));
                let mut inferred = Vec::new();
                for (kws, t) in [
                    (OBJECT_KEYWORDS, "object"),
                    (ARRAY_KEYWORDS, "array"),
                    (STRING_KEYWORDS, "string"),
                    (NUMBER_KEYWORDS, "number"),
                ] {
                    if has(kws) {
                        inferred.push(t);
                    }
                }
                if inferred.is_empty() {
                    return self.j.value();
                }
                inferred
            }
        };
        let mut alts = Vec::new();
        for t in TYPES {
            if !types.contains(t) || (*t == "integer" && types.contains(&"number")) {
                continue;
            }
            let rule = match *t {
                "string" => self.string(obj, ptr)?,
                "number" => self.number(obj, ptr, false)?,
                "integer" => self.number(obj, ptr, true)?,
                "boolean" => self.j.boolean()?,
                "null" => self.j.null()?,
                "object" => self.object(obj, ptr)?,
                _ => self.array(obj, ptr)?,
            };
            alts.push(vec![Sym::Rule(rule)]);
        }
        self.alternatives(ptr, alts)
    }

    /// A non-negative integer keyword such as `minItems`, at most [`MAX_BOUND`].
    fn bound(
        &self,
        obj: &Map<String, Value>,
        keyword: &str,
        ptr: &str,
    ) -> Result<Option<u32>, GrammarError> {
        let Some(v) = obj.get(keyword) else {
            return Ok(None);
        };
        let n = v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| {
                self.invalid(ptr, format!("\"{keyword}\" must be a non-negative integer"))
            })?;
        if n > MAX_BOUND {
            return Err(self.invalid(
                ptr,
                format!(
                    "\"{keyword}\": {n} is above the largest bound this grammar compiler \
                     accepts ({MAX_BOUND}); lower it or remove it"
                ),
            ));
        }
        Ok(Some(n as u32))
    }

    fn string(&mut self, obj: &Map<String, Value>, ptr: &str) -> Result<RuleId, GrammarError> {
        let min = self.bound(obj, "minLength", ptr)?;
        let max = self.bound(obj, "maxLength", ptr)?;
        if let Some(format) = obj.get("format") {
            if let Some(k) = ["minLength", "maxLength"]
                .into_iter()
                .find(|k| obj.contains_key(*k))
            {
                return Err(GrammarError::Combination {
                    keyword: k.into(),
                    with: "format".into(),
                    path: self.path(ptr),
                });
            }
            let name = format
                .as_str()
                .ok_or_else(|| self.invalid(ptr, "\"format\" must be a string"))?;
            return self
                .j
                .format(name)?
                .ok_or_else(|| GrammarError::Unsupported {
                    keyword: format!("format: {name}"),
                    path: self.path(ptr),
                });
        }
        let min = min.unwrap_or(0);
        if max.is_some_and(|max| max < min) {
            return Err(self.invalid(ptr, "\"maxLength\" is below \"minLength\""));
        }
        if min == 0 && max.is_none() {
            return self.j.string();
        }
        let seq = self.j.string_len(min, max)?;
        self.j.b.rule(self.path(ptr), vec![seq])
    }

    /// A numeric bound as f64, if present.
    fn num(
        &self,
        obj: &Map<String, Value>,
        keyword: &str,
        ptr: &str,
    ) -> Result<Option<f64>, GrammarError> {
        match obj.get(keyword) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.invalid(
                    ptr,
                    format!(
                        "\"{keyword}\" must be a number (draft 2020-12; draft-04's boolean form \
                     is not supported)"
                    ),
                )
            }),
        }
    }

    fn number(
        &mut self,
        obj: &Map<String, Value>,
        ptr: &str,
        integer: bool,
    ) -> Result<RuleId, GrammarError> {
        let cap = max_magnitude() as f64;
        let (mut lo, mut hi) = (None::<f64>, None::<f64>);
        if integer {
            // For integers every bound becomes an inclusive integer bound.
            let candidates_lo = [
                self.num(obj, "minimum", ptr)?.map(f64::ceil),
                self.num(obj, "exclusiveMinimum", ptr)?
                    .map(|x| x.floor() + 1.0),
            ];
            let candidates_hi = [
                self.num(obj, "maximum", ptr)?.map(f64::floor),
                self.num(obj, "exclusiveMaximum", ptr)?
                    .map(|x| x.ceil() - 1.0),
            ];
            lo = candidates_lo.into_iter().flatten().reduce(f64::max);
            hi = candidates_hi.into_iter().flatten().reduce(f64::min);
        } else {
            for k in ["exclusiveMinimum", "exclusiveMaximum"] {
                if obj.contains_key(k) {
                    return Err(self.unsupported(ptr, k));
                }
            }
            for (k, slot) in [("minimum", &mut lo), ("maximum", &mut hi)] {
                if let Some(x) = self.num(obj, k, ptr)? {
                    if x.fract() != 0.0 {
                        // Only integer bounds for numbers: "x >= 0.5" needs digit-by-digit
                        // comparison of fractions, which is not implemented.
                        return Err(self.unsupported(ptr, k));
                    }
                    *slot = Some(x);
                }
            }
        }
        if lo.is_none() && hi.is_none() {
            return if integer {
                self.j.integer()
            } else {
                self.j.number()
            };
        }
        if lo.is_some_and(|l| l > cap) || hi.is_some_and(|h| h < -cap) {
            let digits = crate::json::MAX_INT_DIGITS;
            return Err(self.invalid(
                ptr,
                format!(
                    "the bounds exclude every number of at most {digits} integer digits, the \
                     most this grammar writes; change the bounds"
                ),
            ));
        }
        // Bounds beyond the digit limit are looser than the limit itself: drop them.
        let lo = lo.filter(|l| *l >= -cap).map(|l| l as i64);
        let hi = hi.filter(|h| *h <= cap).map(|h| h as i64);
        let alts = if integer {
            integer_range(self.j, lo, hi)?
        } else {
            number_range(self.j, lo, hi)?
        };
        if alts.is_empty() {
            return Err(self.invalid(
                ptr,
                "no number satisfies both the lower and the upper bound",
            ));
        }
        self.j.b.rule(self.path(ptr), alts)
    }

    fn object(&mut self, obj: &'a Map<String, Value>, ptr: &str) -> Result<RuleId, GrammarError> {
        let props: Vec<(&String, &Value)> = match obj.get("properties") {
            None => Vec::new(),
            Some(Value::Object(p)) => p.iter().collect(),
            Some(_) => return Err(self.invalid(ptr, "\"properties\" must be an object")),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|k| {
                    k.as_str().ok_or_else(|| {
                        self.invalid(ptr, "\"required\" must be an array of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(self.invalid(ptr, "\"required\" must be an array of strings")),
        };
        let additional = match obj.get("additionalProperties") {
            None | Some(Value::Bool(true)) => Some(self.j.value()?),
            Some(Value::Bool(false)) => None,
            Some(schema) => Some(self.compile(schema, &format!("{ptr}/additionalProperties"))?),
        };
        if props.is_empty()
            && required.is_empty()
            && obj
                .get("additionalProperties")
                .is_none_or(|a| a == &Value::Bool(true))
        {
            return self.j.object_any();
        }

        // (key, value rule, required) in output order.
        let mut members: Vec<(String, RuleId, bool)> = Vec::new();
        let mut all_keys: Vec<&str> = Vec::new();
        for (key, schema) in &props {
            all_keys.push(key.as_str());
            let is_required = required.contains(&key.as_str());
            let sub = format!("{ptr}/properties/{}", pointer_token(key));
            if **schema == Value::Bool(false) {
                if is_required {
                    return Err(self.invalid(
                        &sub,
                        "a required property has the schema `false`, so no object satisfies this \
                         schema; make it optional or give it a schema",
                    ));
                }
                continue;
            }
            members.push(((*key).clone(), self.compile(schema, &sub)?, is_required));
        }
        for key in &required {
            if all_keys.contains(key) || members.iter().any(|(k, _, _)| k == key) {
                continue;
            }
            let Some(value) = additional else {
                return Err(self.invalid(
                    ptr,
                    format!(
                        "\"{key}\" is required but not in \"properties\", and \
                         \"additionalProperties\" is false; declare it"
                    ),
                ));
            };
            all_keys.push(key);
            members.push(((*key).to_string(), value, true));
        }

        let path = self.path(ptr);
        let extra = match additional {
            Some(value) => {
                let key = self.j.key_not_in(&all_keys, &format!("{path} other key"))?;
                Some(self.j.member(key, value)?)
            }
            None => None,
        };
        // after: the members that may follow once one has been written, from index i on.
        // first: a non-empty member list whose first member is at index >= i (None: impossible).
        let (mut after, mut first) = match extra {
            Some(m) => {
                let more = self.j.members_star(m)?;
                (
                    vec![Sym::Rule(more)],
                    Some(self.j.b.rule(
                        format!("{path} other members"),
                        vec![vec![Sym::Rule(m), Sym::Rule(more)]],
                    )?),
                )
            }
            None => (Vec::new(), None),
        };
        for (key, value, is_required) in members.iter().rev() {
            let key_lit = self.j.b.rule(
                format!("{path} key {key}"),
                vec![lit(Value::String(key.clone()).to_string().as_bytes())],
            )?;
            let member = self.j.member(key_lit, *value)?;
            let comma_member = self.j.comma_item(member)?;
            let after_rule = self
                .j
                .b
                .rule(format!("{path} members after {key}"), vec![after])?;
            let mut first_alts = vec![vec![Sym::Rule(member), Sym::Rule(after_rule)]];
            let mut after_alts = vec![vec![Sym::Rule(comma_member), Sym::Rule(after_rule)]];
            if !is_required {
                after_alts.push(vec![Sym::Rule(after_rule)]);
                first_alts.extend(first.map(|f| vec![Sym::Rule(f)]));
            }
            after = vec![Sym::Rule(
                self.j
                    .b
                    .rule(format!("{path} members from {key}"), after_alts)?,
            )];
            first = Some(
                self.j
                    .b
                    .rule(format!("{path} first member from {key}"), first_alts)?,
            );
        }
        let may_be_empty = members.iter().all(|(_, _, r)| !r);
        let inner = first.map(|f| vec![Sym::Rule(f)]).into_iter().collect();
        let alts = self.j.object_of(inner, may_be_empty)?;
        self.j.b.rule(path, alts)
    }

    fn array(&mut self, obj: &'a Map<String, Value>, ptr: &str) -> Result<RuleId, GrammarError> {
        // prefix: schemas of the first items; rest: schema of every later item (None: no more).
        let (prefix_kw, prefix, rest_kw) = match (obj.get("prefixItems"), obj.get("items")) {
            (Some(p), _) => ("prefixItems", Some(p), "items"),
            (None, Some(Value::Array(_))) => ("items", obj.get("items"), "additionalItems"),
            (None, _) => ("prefixItems", None, "items"),
        };
        let mut prefix_rules = Vec::new();
        if let Some(p) = prefix {
            let Some(p) = p.as_array() else {
                return Err(
                    self.invalid(ptr, format!("\"{prefix_kw}\" must be an array of schemas"))
                );
            };
            for (i, schema) in p.iter().enumerate() {
                prefix_rules.push(match schema {
                    Value::Bool(false) => None,
                    s => Some(self.compile(s, &format!("{ptr}/{prefix_kw}/{i}"))?),
                });
            }
        }
        let rest = match obj.get(rest_kw) {
            None | Some(Value::Bool(true)) => Some(self.j.value()?),
            Some(Value::Bool(false)) => None,
            Some(schema) => Some(self.compile(schema, &format!("{ptr}/{rest_kw}"))?),
        };
        // A `false` prefix item caps the length before it.
        let p = prefix_rules
            .iter()
            .position(Option::is_none)
            .unwrap_or(prefix_rules.len());
        let prefix_rules: Vec<RuleId> = prefix_rules.into_iter().take(p).flatten().collect();
        let rest = if p < prefix.and_then(Value::as_array).map_or(0, Vec::len) {
            None
        } else {
            rest
        };

        let min = self.bound(obj, "minItems", ptr)?.unwrap_or(0);
        let mut max = self.bound(obj, "maxItems", ptr)?;
        if rest.is_none() {
            max = Some(max.map_or(p as u32, |m| m.min(p as u32)));
        }
        if max.is_some_and(|m| m < min) {
            return Err(self.invalid(
                ptr,
                "\"minItems\" is above \"maxItems\" (or above the number of items the schema \
                 allows); lower minItems",
            ));
        }
        if p == 0 && min == 0 && max.is_none() && rest == Some(self.j.value()?) {
            return self.j.array_any();
        }
        let path = self.path(ptr);
        let elem = |i: usize| {
            if i < p {
                prefix_rules.get(i).copied()
            } else {
                rest
            }
        };

        // tail: the symbols that may follow once `i` items are written, built from
        // i = start = max(1, min(p, maxItems)) down to 1. From `start` on, either every further
        // item follows `rest` (start >= p) or no item may follow (start == maxItems < p).
        let start = max.map_or(p, |m| p.min(m as usize)).max(1);
        let mut tail: Seq = match rest {
            Some(r) if start >= p => {
                let comma = self.j.comma_item(r)?;
                let i = start as u32;
                self.j.b.repeat(
                    comma,
                    min.saturating_sub(i),
                    max.map(|m| m.saturating_sub(i)),
                )?
            }
            _ => Vec::new(),
        };
        for i in (1..start).rev() {
            // i < p here: item i comes from the prefix.
            let Some(item) = elem(i) else { break };
            let comma = self.j.comma_item(item)?;
            let mut more = vec![Sym::Rule(comma)];
            more.extend(tail);
            let mut alts = vec![more];
            if i as u32 >= min {
                alts.push(Vec::new());
            }
            tail = vec![Sym::Rule(
                self.j.b.rule(format!("{path} items from {i}"), alts)?,
            )];
        }
        let mut inner = Vec::new();
        if max.is_none_or(|m| m >= 1) {
            if let Some(first) = elem(0) {
                let mut seq = vec![Sym::Rule(first)];
                seq.extend(tail);
                inner.push(seq);
            }
        }
        let alts = self.j.array_of(inner, min == 0)?;
        self.j.b.rule(path, alts)
    }
}

/// Whether `v` is of JSON Schema type `t`.
fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "object" => v.is_object(),
        _ => v.is_array(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_object_builds() {
        let g = Grammar::json_object();
        assert!(g.rule_count() > 5);
    }
}
