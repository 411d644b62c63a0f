"""AI pipelines: pure StudyInput -> PipelineResult functions, one folder each."""
