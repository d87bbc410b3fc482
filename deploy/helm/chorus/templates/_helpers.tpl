{{- define "chorus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chorus.labels" -}}
app.kubernetes.io/name: chorus
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "chorus.selector" -}}
app.kubernetes.io/name: chorus
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The label selector the coordinator's discovery uses to find this release's workers. */}}
{{- define "chorus.workerSelector" -}}
app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=worker
{{- end -}}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chorus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the worker's --model gets: a path inside the mounted volume, or the hub id. */}}
{{- define "chorus.modelPath" -}}
{{- $s := .source -}}
{{- if $s.hub -}}{{ $s.hub.id }}
{{- else if $s.pvc -}}{{ printf "/models/%s" (default "" $s.pvc.subPath) | trimSuffix "/" }}
{{- else -}}/models
{{- end -}}
{{- end -}}

{{- define "chorus.drainSeconds" -}}
{{- sub .Values.terminationGracePeriodSeconds 10 -}}
{{- end -}}

{{- define "chorus.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
