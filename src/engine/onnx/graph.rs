//! A read-only view of a graph for the transformations in later stages: nodes in topological
//! order, who produces and who consumes each value, and weights by name.
use super::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use crate::engine::{EngineError, Result};
use std::collections::{HashMap, VecDeque};

pub struct GraphView<'g> {
    pub graph: &'g GraphProto,
    /// Node indices in an order where every node comes after the producers of its inputs.
    pub order: Vec<usize>,
    /// Value name -> index of the node that produces it.
    pub producer: HashMap<&'g str, usize>,
    /// Value name -> indices of the nodes that read it.
    pub consumers: HashMap<&'g str, Vec<usize>>,
    /// Weight name -> tensor, from initializers and `Constant` nodes.
    pub weights: HashMap<&'g str, &'g TensorProto>,
    /// Value name -> declared type and shape (graph inputs, outputs and intermediate value infos).
    pub value_infos: HashMap<&'g str, &'g ValueInfoProto>,
}

impl<'g> GraphView<'g> {
    pub fn new(graph: &'g GraphProto) -> Result<Self> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut weights: HashMap<&str, &TensorProto> = HashMap::new();
        for t in &graph.initializer {
            weights.insert(t.name.as_deref().unwrap_or(""), t);
        }
        for (i, node) in graph.node.iter().enumerate() {
            for out in &node.output {
                producer.insert(out.as_str(), i);
            }
            for input in node.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(input.as_str()).or_default().push(i);
            }
            if node.op_type.as_deref() == Some("Constant") {
                if let (Some(out), Some(t)) = (
                    node.output.first(),
                    node.attribute.iter().find_map(|a| a.t.as_ref()),
                ) {
                    weights.insert(out.as_str(), t);
                }
            }
        }
        let order = topological_order(&graph.node, &producer)?;
        let value_infos = graph
            .input
            .iter()
            .chain(&graph.output)
            .chain(&graph.value_info)
            .filter_map(|v| v.name.as_deref().map(|n| (n, v)))
            .collect();
        Ok(Self {
            graph,
            order,
            producer,
            consumers,
            weights,
            value_infos,
        })
    }

    pub fn node(&self, index: usize) -> &'g NodeProto {
        &self.graph.node[index]
    }

    /// Nodes in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = &'g NodeProto> + '_ {
        self.order.iter().map(|&i| &self.graph.node[i])
    }
}

/// Kahn's algorithm; ties keep file order so results are deterministic.
fn topological_order(nodes: &[NodeProto], producer: &HashMap<&str, usize>) -> Result<Vec<usize>> {
    let mut indegree = vec![0usize; nodes.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for input in node.input.iter().filter(|s| !s.is_empty()) {
            if let Some(&p) = producer.get(input.as_str()) {
                if p != i {
                    indegree[i] += 1;
                    dependents[p].push(i);
                }
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    if order.len() != nodes.len() {
        return Err(EngineError::InvalidModel("the graph has a cycle".into()));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn nodes_listed_out_of_order_come_out_in_dependency_order() {
        let graph = GraphProto {
            node: vec![
                node("Relu", &["h"], &["y"]),
                node("MatMul", &["x", "w"], &["h"]),
                node("Constant", &[], &["w"]),
            ],
            initializer: vec![TensorProto {
                name: Some("b".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = GraphView::new(&graph).unwrap();
        let ops: Vec<&str> = view
            .nodes()
            .map(|n| n.op_type.as_deref().unwrap())
            .collect();
        assert_eq!(ops, ["Constant", "MatMul", "Relu"]);
        assert_eq!(view.producer["h"], 1);
        assert_eq!(view.consumers["h"], vec![0]);
        assert!(view.weights.contains_key("b"), "initializers are weights");
    }

    #[test]
    fn a_cycle_is_an_invalid_model() {
        let graph = GraphProto {
            node: vec![
                node("Add", &["a", "y"], &["x"]),
                node("Relu", &["x"], &["y"]),
            ],
            ..Default::default()
        };
        assert!(matches!(
            GraphView::new(&graph),
            Err(EngineError::InvalidModel(_))
        ));
    }
}
