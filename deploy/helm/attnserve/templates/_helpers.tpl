{{/* Names and labels shared by every object of the release. */}}
{{- define "attnserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "attnserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "attnserve.labels" -}}
{{ include "attnserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "attnserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "attnserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "attnserve.authSecretName" -}}
{{- default (printf "%s-auth" (include "attnserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The per-pod series the autoscalers read: images waiting in this pod's queues. */}}
{{- define "attnserve.queueMetric" -}}attnserve_queue_depth{{- end -}}
